"""Per-node ownership for groups and the manual release-then-take step."""

from __future__ import annotations

from multihost.config import parse_config
from multihost.ownership import ownership, release_step, targets

CFG = parse_config(
    """
[cluster]
name = "t"
interface = "eth0"
multicast_group = "239.192.0.9"
key_file = "k"
[[node]]
name = "A"
address = "198.18.0.1"
slot = 0
[[node]]
name = "B"
address = "198.18.0.2"
slot = 5
[[node]]
name = "C"
address = "198.18.0.3"
slot = 2
[[traffic_ip_group]]
name = "all"
addresses = ["198.18.0.100"]
members = ["A", "B", "C"]
[[traffic_ip_group]]
name = "two"
addresses = ["198.18.0.101"]
members = ["A", "C"]
"""
)


def test_targets_partition_every_group() -> None:
    live = ["A", "B", "C"]
    per_node = {n: targets(CFG, n, live) for n in live}
    for group, size in (("all", 3), ("two", 2)):
        union: set[int] = set()
        for n in live:
            mine = per_node[n][group]
            assert not union & mine
            union |= mine
        assert len(union) == 40320
        owners = [n for n in live if per_node[n][group]]
        assert len(owners) == size


def test_non_member_owns_nothing() -> None:
    assert targets(CFG, "B", ["A", "B", "C"])["two"] == frozenset()


def test_shares_follow_live_members_only() -> None:
    own = ownership(CFG, ["A", "C"])
    assert own["all"].live == ("A", "C")
    assert {m: str(f) for m, f in own["all"].shares(CFG.slots).items()} == {"A": "1/2", "C": "1/2"}


def test_release_step_never_takes() -> None:
    before = targets(CFG, "A", ["A", "B", "C"])
    after = targets(CFG, "A", ["A", "C"])  # B failed: A gains
    rel = release_step(before, after)
    assert rel == before  # nothing to release when gaining
    back = release_step(after, before)  # B recovers: A must drop B's share first
    assert back == before
    assert all(back[g] <= after[g] for g in back)
