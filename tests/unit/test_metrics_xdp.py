"""Counters reach Prometheus: the XDP verdicts as multihost_xdp_packets_total, the
membership counters per node."""

from __future__ import annotations

from prometheus_client import generate_latest

from multihost.metrics import Metrics, Snapshot


def test_xdp_verdicts_are_exported_per_group() -> None:
    m = Metrics("A")
    m.publish(
        Snapshot(
            packets={
                "web": {
                    "accepted_packets": 7,
                    "dropped_packets": 3,
                    "xdp_owned_packets": 5,
                    "xdp_handover_passed_packets": 2,
                    "xdp_dropped_packets": 3,
                    "xdp_owned_bytes": 500,
                }
            }
        )
    )
    text = generate_latest(m.registry).decode()
    assert 'multihost_xdp_packets_total{group="web",node="A",verdict="owned"} 5.0' in text
    assert 'verdict="handover_passed"} 2.0' in text
    assert 'verdict="owned_bytes"' not in text
    assert 'multihost_packets_total{group="web",node="A",verdict="accepted"} 7.0' in text


def test_membership_counters_are_exported_per_node() -> None:
    m = Metrics("A")
    m.publish(Snapshot(heartbeats_sent=4, view_changes=2, pauses=3, paused_seconds=0.25))
    text = generate_latest(m.registry).decode()
    assert 'multihost_heartbeats_sent_total{node="A"} 4.0' in text
    assert 'multihost_view_changes_total{node="A"} 2.0' in text
    assert 'multihost_pauses_total{node="A"} 3.0' in text
    assert 'multihost_paused_seconds_total{node="A"} 0.25' in text
