"""The ruleset the ``BPF_PROG_RUN`` tests of the XDP program load (test_xdp_*.py).

Owns: the traffic IPs (one IPv4, one IPv6), the table size, and the one-group ("web") spec for
a hash mode and seed.  The namespace and pin directory fixtures are in conftest.py.

Must not: touch the kernel.
"""

from __future__ import annotations

import ipaddress

from multihost.dataplane.ruleset import GroupSpec, RulesetSpec
from multihost.flowhash import HashMode

VIP4 = ipaddress.ip_address("198.18.0.100")
VIP6 = ipaddress.ip_address("2001:db8::100")
BUCKETS = 40320


def web_spec(mode: HashMode, seed: int) -> RulesetSpec:
    return RulesetSpec(BUCKETS, seed, (GroupSpec("web", (VIP4, VIP6), mode),))
