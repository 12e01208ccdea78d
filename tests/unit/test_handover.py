"""The handover sets: lost -> draining, gained from a live member -> incoming, from a dead
one -> owned; drained and promoted on evidence or after max_drain."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.handover import Handover

ALIVE = {"B"}


def prev(b: int) -> str | None:
    return "B" if b < 10 else ("C" if b < 20 else None)


def test_lose_drains_and_gain_from_live_is_incoming() -> None:
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset(range(5)), lambda b: None, lambda m: True, 0.0)
    assert h.snapshot("g").owned == frozenset(range(5))
    # lose 0..1, gain 5..6 from B (alive) and 15 from C (dead) and 25 (nobody)
    h.retarget("g", frozenset({2, 3, 4, 5, 6, 15, 25}), prev, lambda m: m in ALIVE, 1.0)
    s = h.snapshot("g")
    assert s.draining == {0, 1}
    assert s.incoming == {5, 6}
    assert s.owned == {2, 3, 4, 15, 25}
    assert h.claims("g") == {2, 3, 4, 5, 6, 15, 25}
    assert h.serving("g") == h.claims("g") | {0, 1}


def test_drained_by_evidence_or_timeout() -> None:
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset({1, 2, 3}), lambda b: None, lambda m: True, 0.0)
    h.retarget("g", frozenset(), lambda b: None, lambda m: True, 1.0)
    assert h.drained("g", {2, 3}, 2.0) == 1  # bucket 1 has no flow left
    assert h.snapshot("g").draining == {2, 3}
    assert h.drained("g", {2, 3}, 6.0) == 2  # max_drain passed
    assert h.snapshot("g").draining == frozenset()


def test_promote_when_old_owner_finished_or_timeout() -> None:
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset({5, 15}), prev, lambda m: True, 0.0)
    assert h.snapshot("g").incoming == {5, 15}
    assert h.promote("g", lambda m: m == "B", 1.0) == 1
    assert h.snapshot("g").owned == {5}
    assert h.promote("g", lambda m: False, 5.0) == 1
    assert h.snapshot("g").owned == {5, 15}
    assert h.next_deadline() is None


def test_regaining_a_draining_bucket_goes_through_incoming() -> None:
    # Another member served it meanwhile: it may have new flows there.
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset({1}), lambda b: None, lambda m: True, 0.0)
    h.retarget("g", frozenset(), lambda b: None, lambda m: True, 1.0)
    h.retarget("g", frozenset({1}), prev, lambda m: True, 2.0)
    assert h.snapshot("g").incoming == {1}
    assert h.snapshot("g").draining == frozenset()


def test_disabled_handover_is_plain_ownership() -> None:
    h = Handover(["g"], max_drain=5.0, enabled=False)
    h.retarget("g", frozenset({1, 5}), prev, lambda m: True, 0.0)
    h.retarget("g", frozenset({5}), prev, lambda m: True, 1.0)
    s = h.snapshot("g")
    assert s.owned == {5}
    assert not s.draining
    assert not s.incoming


@settings(max_examples=100, deadline=None)
@given(st.lists(st.frozensets(st.integers(0, 30)), min_size=1, max_size=12))
def test_sets_stay_disjoint_and_claims_follow_target(targets: list[frozenset[int]]) -> None:
    h = Handover(["g"], max_drain=3.0)
    for t, target in enumerate(targets):
        h.retarget("g", target, prev, lambda m: m in ALIVE, float(t))
        s = h.snapshot("g")
        assert not (s.owned & s.draining) and not (s.owned & s.incoming)
        assert not (s.draining & s.incoming)
        assert h.claims("g") == target
        assert not (s.draining & target)
