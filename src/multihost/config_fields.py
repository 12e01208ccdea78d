"""Reading one TOML value into one typed field, with errors naming file, key and value.

Owns: :class:`Reader` (typed access to one TOML table: the full key path in every error,
required keys, integer ranges, unknown keys) and the field readers that the sections of
:mod:`multihost.config`, :mod:`multihost.transparency` and :mod:`multihost.backends` share:
IP addresses, the multicast groups a cluster may use, the hash seed, a choice among
strings, interface names.

Must not: know the schema (which keys a section has, their defaults, how sections relate:
:mod:`multihost.config`), or touch files, the network or the kernel.  Pure.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Mapping
from typing import Any

from multihost.config_model import ConfigError, IPAddress


class Reader:
    """Typed access to a TOML table that reports errors with the full key path."""

    def __init__(self, source: str, table: Mapping[str, Any], path: str) -> None:
        self.source, self.table, self.path = source, table, path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def err(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(name)
        if name not in self.table:
            if default is ...:
                raise self.err(name, "is required")
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind is not bool and bool not in _tuple(kind):
            raise self.err(name, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.err(name, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def int_in(self, name: str, lo: int, hi: int, default: Any = ...) -> int:
        value: int = self.get(name, int, default)
        if not lo <= value <= hi:
            raise self.err(name, f"{value} is outside {lo}..{hi}")
        return value

    def finish(self) -> None:
        for k in self.table:
            if k not in self.used:
                raise ConfigError(self.source, self.key(k), "unknown key")


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        str: "a string",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in _tuple(kind))


def read_address(r: Reader, key: str, text: Any) -> IPAddress:
    if not isinstance(text, str):
        raise ConfigError(r.source, key, f"expected an IP address string, got {text!r}")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(r.source, key, f"{text!r} is not an IP address") from None


#: Multicast groups a cluster may use: organisation-local IPv4 (RFC 2365) and transient IPv6
#: groups of link, admin, site or organisation scope (RFC 4291 2.7: flags 1, scope 2..8).
_V6_SCOPES = {2: "link", 4: "admin", 5: "site", 8: "organisation"}


def read_mcast_group(r: Reader, key: str, text: str) -> IPAddress:
    try:
        group = ipaddress.ip_address(text)
    except ValueError:
        raise r.err(key, f"{text!r} is not an IP address") from None
    if isinstance(group, ipaddress.IPv4Address):
        if not group.is_multicast:
            raise r.err(key, f"{group} is not a multicast address (224.0.0.0/4)")
        if group in ipaddress.IPv4Network("224.0.0.0/24"):
            raise r.err(key, f"{group} is link-local control; use 239.192.0.0/14")
        return group
    if not group.is_multicast:
        raise r.err(key, f"{group} is not a multicast address (ff00::/8)")
    flags, scope = group.packed[1] >> 4, group.packed[1] & 0xF
    if flags & 1 == 0:
        raise r.err(
            key, f"{group} is a permanent, well-known group; use a transient one (ff15::/16)"
        )
    if scope not in _V6_SCOPES:
        raise r.err(
            key,
            f"{group} has scope {scope:x}; use link (2), admin (4), site (5) or organisation (8)"
            " scope, e.g. ff15::/16",
        )
    return group


def read_seed(r: Reader, name: str, cluster_name: str) -> int:
    value = r.get(name, (int, str), None)
    if value is None:
        return zlib.crc32(cluster_name.encode())
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise r.err(name, f"{value!r} is not an integer (e.g. 0x5eed1234)") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise r.err(name, f"{value} is not a 32-bit value")
    return int(value)


def interface_name_problem(name: str) -> str | None:
    if not 1 <= len(name) <= 15 or "/" in name or " " in name:
        return f"{name!r} is not a valid interface name"
    return None


def read_choice(r: Reader, name: str, choices: tuple[str, ...], default: str) -> str:
    value = r.get(name, str, default)
    if value not in choices:
        raise r.err(name, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return str(value)
