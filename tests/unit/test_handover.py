"""The handover sets: lost -> draining, gained -> incoming while another member drains (else
owned); drained on conntrack evidence and promoted when nobody else drains, or after
max_drain."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from multihost.handover import Handover


def test_lose_drains_and_gain_is_incoming_while_others_drain() -> None:
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset(range(5)), False, 0.0)
    assert h.snapshot("g").owned == frozenset(range(5))
    h.retarget("g", frozenset({2, 3, 4, 5, 6}), True, 1.0)  # lose 0..1, gain 5..6
    s = h.snapshot("g")
    assert s.draining == {0, 1}
    assert s.incoming == {5, 6}
    assert s.owned == {2, 3, 4}
    assert h.claims("g") == {2, 3, 4, 5, 6}
    assert h.serving("g") == h.claims("g") | {0, 1}


def test_gain_with_nobody_draining_is_owned_at_once() -> None:
    # e.g. a crash while no other member drains: its clients get resets quickly
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset({1}), False, 0.0)
    h.retarget("g", frozenset({1, 7, 8}), False, 1.0)
    assert h.snapshot("g").owned == {1, 7, 8}
    assert not h.snapshot("g").incoming


def test_drained_by_evidence_or_timeout() -> None:
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset({1, 2, 3}), False, 0.0)
    h.retarget("g", frozenset(), False, 1.0)
    assert h.drained("g", {2, 3}, 2.0) == 1  # bucket 1 has no flow left
    assert h.snapshot("g").draining == {2, 3}
    assert h.drained("g", {2, 3}, 6.0) == 2  # max_drain passed
    assert h.snapshot("g").draining == frozenset()


def test_promote_when_nobody_else_drains_or_timeout() -> None:
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset({5}), True, 0.0)
    h.retarget("g", frozenset({5, 15}), True, 2.0)
    assert h.snapshot("g").incoming == {5, 15}
    assert h.promote("g", True, 1.0) == 0  # someone still drains
    assert h.promote("g", True, 5.0) == 1  # 5 reached max_drain
    assert h.snapshot("g").owned == {5}
    assert h.promote("g", False, 5.5) == 1
    assert h.snapshot("g").owned == {5, 15}
    assert h.next_deadline() is None


def test_losing_an_incoming_bucket_drains_it() -> None:
    # It may hold new flows this node accepted while it was incoming (a lease lapse or a
    # new view can take it away again before it was promoted).
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset({4}), True, 0.0)
    h.retarget("g", frozenset(), True, 1.0)
    assert h.snapshot("g").draining == {4}
    assert not h.snapshot("g").incoming


def test_regaining_a_draining_bucket_goes_through_incoming_while_others_drain() -> None:
    # Another member served it meanwhile: it may have new flows there.
    h = Handover(["g"], max_drain=5.0)
    h.retarget("g", frozenset({1, 2}), False, 0.0)
    h.retarget("g", frozenset(), False, 1.0)
    h.retarget("g", frozenset({1}), True, 2.0)
    assert h.snapshot("g").incoming == {1}
    assert h.snapshot("g").draining == {2}
    h.retarget("g", frozenset({1, 2}), False, 3.0)
    assert h.snapshot("g").owned == {2} and h.snapshot("g").incoming == {1}


def test_chain_through_a_crashed_member_waits_for_the_drainer() -> None:
    # D drained bucket 9 to A; A crashed; C takes it while D still advertises draining:
    # C must not answer D's established flows with resets until D has finished.
    c = Handover(["g"], max_drain=60.0)
    c.retarget("g", frozenset({9}), True, 10.0)
    assert c.snapshot("g").incoming == {9}
    assert c.promote("g", True, 11.0) == 0
    assert c.promote("g", False, 12.0) == 1


def test_disabled_handover_is_plain_ownership() -> None:
    h = Handover(["g"], max_drain=5.0, enabled=False)
    h.retarget("g", frozenset({1, 5}), True, 0.0)
    h.retarget("g", frozenset({5}), True, 1.0)
    s = h.snapshot("g")
    assert s.owned == {5}
    assert not s.draining
    assert not s.incoming


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.frozensets(st.integers(0, 30)), st.booleans()), min_size=1, max_size=12)
)
def test_sets_stay_disjoint_and_claims_follow_target(
    steps: list[tuple[frozenset[int], bool]],
) -> None:
    h = Handover(["g"], max_drain=3.0)
    for t, (target, others) in enumerate(steps):
        before = h.claims("g")
        h.retarget("g", target, others, float(t))
        s = h.snapshot("g")
        assert not (s.owned & s.draining) and not (s.owned & s.incoming)
        assert not (s.draining & s.incoming)
        assert h.claims("g") == target
        assert not (s.draining & target)
        assert before - target <= s.draining  # nothing claimed is dropped without draining
        h.promote("g", others, t + 0.5)
        assert h.claims("g") == target
