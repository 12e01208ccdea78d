"""Prometheus metrics of the agent (off unless ``cluster.metrics_address`` is set).

Owns: metric names and labels, the registry, and the HTTP endpoint (prometheus-client's
server thread).  The agent's event loop publishes a :class:`Snapshot` (plain data) after
each event and every second; the scrape thread only reads the latest snapshot, so nothing
here touches the nft context or the protocol core from another thread.  The reprogramming
histogram is thread-safe by itself.

Must not: compute anything the agent does not already know.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Buckets (seconds) for "view change -> kernel reprogrammed"; the target is 20 ms.
REPROGRAM_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


@dataclass
class Snapshot:
    heartbeats_sent: int = 0
    heartbeats_received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    view_changes: int = 0
    pauses: int = 0  # times this node could not run past its deadline (membership "paused")
    paused_seconds: float = 0.0
    members_up: dict[str, bool] = field(default_factory=dict)
    owned_buckets: dict[str, int] = field(default_factory=dict)
    # group -> {"accepted_packets", "accepted_bytes", "dropped_packets", "dropped_bytes"}
    packets: dict[str, dict[str, int]] = field(default_factory=dict)
    arp: dict[str, int] = field(default_factory=dict)


class _SnapshotCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        s = self.metrics.snapshot
        node = self.metrics.node
        per_node = (
            ("multihost_heartbeats_sent", "Heartbeats sent", s.heartbeats_sent),
            ("multihost_heartbeats_received", "Valid heartbeats received", s.heartbeats_received),
            ("multihost_view_changes", "Live-set changes", s.view_changes),
            (
                "multihost_pauses",
                "Times this node (its process or VM) could not run past its membership deadline",
                s.pauses,
            ),
            (
                "multihost_paused_seconds",
                "Time past the deadline in those pauses (not held against the peers' silence)",
                s.paused_seconds,
            ),
        )
        for name, doc, value in per_node:
            c = CounterMetricFamily(name, doc, labels=["node"])
            c.add_metric([node], value)
            yield c
        c = CounterMetricFamily(
            "multihost_heartbeats_rejected", "Heartbeats rejected", labels=["node", "reason"]
        )
        for reason, n in sorted(s.rejected.items()):
            c.add_metric([node, reason], n)
        yield c
        g = GaugeMetricFamily(
            "multihost_member_up",
            "1 if this node believes the member alive",
            labels=["node", "member"],
        )
        for m, up in sorted(s.members_up.items()):
            g.add_metric([node, m], 1.0 if up else 0.0)
        yield g
        g = GaugeMetricFamily(
            "multihost_owned_buckets", "Buckets this node serves", labels=["node", "group"]
        )
        for grp, n in sorted(s.owned_buckets.items()):
            g.add_metric([node, grp], n)
        yield g
        pk = CounterMetricFamily(
            "multihost_packets",
            "Packets to traffic IPs by verdict (from nft counters)",
            labels=["node", "group", "verdict"],
        )
        by = CounterMetricFamily(
            "multihost_bytes",
            "Bytes to traffic IPs by verdict (from nft counters)",
            labels=["node", "group", "verdict"],
        )
        for grp, vals in sorted(s.packets.items()):
            for verdict in ("accepted", "dropped"):
                pk.add_metric([node, grp, verdict], vals.get(f"{verdict}_packets", 0))
                by.add_metric([node, grp, verdict], vals.get(f"{verdict}_bytes", 0))
        yield pk
        yield by
        xp = CounterMetricFamily(
            "multihost_xdp_packets",
            "Packets to traffic IPs by XDP program verdict (xdp data plane only)",
            labels=["node", "group", "verdict"],
        )
        for grp, vals in sorted(s.packets.items()):
            for key, n in sorted(vals.items()):
                if key.startswith("xdp_") and key.endswith("_packets"):
                    xp.add_metric([node, grp, key[4 : -len("_packets")]], n)
        yield xp
        c = CounterMetricFamily(
            "multihost_arp", "ARP/NDP responder counters", labels=["node", "counter"]
        )
        for name, n in sorted(s.arp.items()):
            c.add_metric([node, name], n)
        yield c


class Metrics:
    def __init__(self, node: str) -> None:
        self.node = node
        self.snapshot = Snapshot()
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(self))
        self.reprogram = Histogram(
            "multihost_reprogram_seconds",
            "Time from a view change to the kernel reprogrammed",
            buckets=REPROGRAM_BUCKETS,
            registry=self.registry,
        )
        self._server: object | None = None

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot  # atomic reference swap; the scrape thread reads it

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        self._server = server

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None
