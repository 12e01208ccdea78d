"""Pure rendering of bucket updates: what changes in the bucket maps between two states.

Owns: the :class:`Delta` between two bucket states of a ruleset (:func:`bucket_delta`: map
by map, the keys to delete and the ``key : data`` elements to add; a key whose data changes
is deleted and re-added, since the kernel refuses to overwrite an element's data) and its
rendering as one transaction, in nft syntax (:func:`render_delta`, :func:`render_update`) and
in libnftables' JSON command schema (:func:`render_delta_json`).  ``netlink`` encodes the
same :class:`Delta` as an nf_tables batch.

Must not: run anything (no subprocess, sockets, ctypes or clocks); ``nft.Dataplane`` decides
when to apply a delta.  The specs, states and map contents are :mod:`.ruleset`'s, the tables
the maps live in :mod:`.rulesettables`'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from multihost.dataplane.ruleset import GroupBuckets, RulesetSpec, check_state, map_contents
from multihost.dataplane.rulesettables import element_list, key_list


@dataclass(frozen=True)
class Delta:
    """Map elements to delete and to add (each key tuple ascending).

    ``removed``: map name -> keys.  ``added``: (map name, data) -> keys whose new element is
    ``key : data``, data as nft writes it (``host``, ``other`` or ``goto <chain>``).  Every
    deletion comes before every addition: a key whose data changes is deleted and re-added.
    """

    removed: dict[str, tuple[int, ...]]
    added: dict[tuple[str, str], tuple[int, ...]]

    @property
    def removed_count(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def added_count(self) -> int:
        return sum(len(v) for v in self.added.values())


def bucket_delta(
    spec: RulesetSpec, before: Mapping[str, GroupBuckets], after: Mapping[str, GroupBuckets]
) -> Delta:
    """What changes, map by map, to go from ``before`` to ``after`` (both are validated)."""
    return delta_of_checked(spec, check_state(spec, before), check_state(spec, after))


def delta_of_checked(
    spec: RulesetSpec, b: Mapping[str, GroupBuckets], a: Mapping[str, GroupBuckets]
) -> Delta:
    """:func:`bucket_delta` for states that :func:`check_state` already returned."""
    removed: dict[str, tuple[int, ...]] = {}
    added: dict[tuple[str, str], tuple[int, ...]] = {}
    for g in spec.groups:
        if b[g.name] is a[g.name] or b[g.name] == a[g.name]:
            continue
        old_maps, new_maps = map_contents(g, b[g.name]), map_contents(g, a[g.name])
        for name, old in old_maps.items():
            new = new_maps[name]
            gone: set[int] = set()
            for data, old_keys in old.items():
                new_keys = new[data]
                if old_keys == new_keys:
                    continue
                gone |= old_keys - new_keys  # not in the map any more, or with other data
                if fresh := new_keys - old_keys:
                    added[(name, data)] = tuple(sorted(fresh))
            if gone:
                removed[name] = tuple(sorted(gone))
    return Delta(removed, added)


def render_delta(spec: RulesetSpec, delta: Delta) -> str:
    """The delta as one script: every removal first, then every addition ('' if empty)."""
    lines = [
        f"delete element inet {spec.table} {name} {{ {key_list(v, '  ')} }}"
        for name, v in delta.removed.items()
    ]
    lines += [
        f"add element inet {spec.table} {name} {{ {element_list(((k, data) for k in v), '  ')} }}"
        for (name, data), v in delta.added.items()
    ]
    return "".join(line + "\n" for line in lines)


def _json_data(data: str) -> object:
    verb, _, chain = data.partition(" ")
    return {verb: {"target": chain}} if chain else data


def render_delta_json(spec: RulesetSpec, delta: Delta) -> str:
    """The delta in libnftables' JSON command schema ('' if empty).

    Same transaction as :func:`render_delta`; libnftables 1.0.6 parses and evaluates it
    faster than the text form (``nft.Dataplane.update`` falls back to it).
    """
    cmds: list[dict[str, object]] = []
    for name, keys in delta.removed.items():
        elem = {"family": "inet", "table": spec.table, "name": name, "elem": list(keys)}
        cmds.append({"delete": {"element": elem}})
    for (name, data), keys in delta.added.items():
        value = _json_data(data)
        items = [[k, value] for k in keys]
        elem = {"family": "inet", "table": spec.table, "name": name, "elem": items}
        cmds.append({"add": {"element": elem}})
    return json.dumps({"nftables": cmds}, separators=(",", ":")) if cmds else ""


def render_update(
    spec: RulesetSpec, before: Mapping[str, GroupBuckets], after: Mapping[str, GroupBuckets]
) -> str:
    """The atomic delta script from ``before`` to ``after`` ('' when nothing changes)."""
    return render_delta(spec, bucket_delta(spec, before, after))
