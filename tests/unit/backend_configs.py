"""The ``[[backend]]`` test configurations shared by tests/unit/test_backends*.py.

Owns: a three-node cluster with one IPv4 back end (slots 0, 5, 2, not in file order, so
tables and priorities follow the slot), a second, IPv6 back end with its own table and
priority bases, the two together with IPv6 gateways (:data:`V6_CFG`), and :func:`cfg_text`:
the base configuration with one edit.
"""

from __future__ import annotations

# Slots 0, 5, 2 (not in file order): tables and priorities follow the slot.
BASE = """
[cluster]
name = "c1"
interface = "eth0"
multicast_group = "239.192.0.1"
key_file = "key"

[[node]]
name = "A"
address = "198.18.0.11"
slot = 0
backend_gateway = "198.19.0.1"

[[node]]
name = "B"
address = "198.18.0.12"
slot = 5
backend_gateway = ["198.19.0.2", "198.19.64.2", "2001:db8:19::2"]

[[node]]
name = "C"
address = "198.18.0.13"
slot = 2
backend_gateway = ["198.19.0.3", "2001:db8:19::3"]

[[traffic_ip_group]]
name = "web"
addresses = ["198.18.0.100"]
members = ["A", "B", "C"]

[[backend]]
name = "db1"
interface = "eth1"
addresses = { A = "198.19.0.101/24", B = "198.19.0.102/24", C = "198.19.0.103/24" }
"""

SECOND = """
[[backend]]
name = "db6"
interface = "ens5"
addresses = { A = "2001:db8:19::101/64", B = "2001:db8:19::102/64", C = "2001:db8:19::103/64" }
table_base = 7600
rule_priority_base = 20000
"""


def cfg_text(old: str = "", new: str = "", extra: str = "") -> str:
    text = BASE + extra
    if old:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


V6_CFG = cfg_text(extra=SECOND).replace(
    'backend_gateway = "198.19.0.1"', 'backend_gateway = ["198.19.0.1", "2001:db8:19::1"]'
)
