"""Fixtures for root tests (tests/conftest.py marks everything here ``root``).

Owns the fixtures that more than one module of this directory uses: the lab data plane and
the session's BPF filesystem (every lab-level module); the data-plane tests' client/node lab
and a data plane of either backend on it (``test_dataplane*.py``; helpers in nsutil_dp.py);
the responder tests' lab and responder processes (``test_responder*.py``; nsutil_arp.py);
the XDP program tests' namespace and pin directory (``test_xdp_prog.py``,
``test_xdp_state.py``).  A module's own fixture of the same name overrides one of these (the
lab-level modules define their own ``lab``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from multihost.dataplane.backend import Backend
from multihost.dataplane.hostsetup import HostSetup
from multihost.dataplane.nft import Dataplane
from multihost.dataplane.ruleset import RulesetSpec
from multihost.dataplane.xdp import XdpDataplane
from multihost.dataplane.xdpobject import is_bpffs, unavailable_reason
from tests.netns import nsutil, nsutil_arp, nsutil_dp
from tests.netns.nsutil import netns_group, ns_run
from tests.netns.nsutil_arp import CLIENT_IF, ResponderProcess, Start, nsexec

#: Every lab-level test runs on both data planes (``[cluster] dataplane``).
BACKENDS = ("nft", "xdp")


@pytest.fixture(scope="module", params=BACKENDS)
def lab_backend(request: pytest.FixtureRequest) -> str:
    """The data plane of the lab a test module builds (the module runs once per backend)."""
    return str(request.param)


@pytest.fixture(scope="session")
def bpf_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A BPF filesystem of the test session's own (a fresh machine may have none mounted at
    /sys/fs/bpf); unmounting it at the end frees whatever a failed test left pinned."""
    d = tmp_path_factory.mktemp("bpffs")
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True, capture_output=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


# ------------------------------------------------------------------- data-plane tests


@pytest.fixture
def lab() -> Iterator[nsutil_dp.Lab]:
    """The data-plane tests' ``client`` and ``node``, the traffic IPs set up on the node."""
    nsutil.cleanup_stale()
    with nsutil.netns_group("client", "node") as ns:
        lab = nsutil_dp.make_lab(ns)
        vips = [nsutil_dp.VIP, nsutil_dp.VIP3, nsutil_dp.VIPS]
        host = HostSetup("n0", vips, nsutil_dp.GROUP, netns=lab.node)
        try:
            host.apply()
            yield lab
        finally:
            lab.nft.close()
            host.restore()


@pytest.fixture(params=["nft", "xdp"])
def make_dp(
    request: pytest.FixtureRequest, lab: nsutil_dp.Lab, bpf_root: Path
) -> Iterator[Callable[[RulesetSpec], Backend]]:
    """A data plane of either backend on the node (tests that hold for both)."""
    made: list[Backend] = []

    def make(spec: RulesetSpec) -> Backend:
        dp: Backend
        if request.param == "nft":
            dp = Dataplane(spec, lab.nft)
        else:
            dp = XdpDataplane(spec, "n0", bpf_root / f"{lab.node}-pins", netns=lab.node)
        made.append(dp)
        return dp

    yield make
    for dp in made:
        if dp.backend == "xdp":
            dp.remove()


# --------------------------------------------------------------------- responder tests


@pytest.fixture(scope="module")
def arp_lab() -> Iterator[nsutil_arp.Lab]:
    """The responder tests' lab (one per module): a switch, a client and two nodes."""
    lab = nsutil_arp.Lab.create(n_nodes=2)
    try:
        yield lab
    finally:
        lab.destroy()


@pytest.fixture
def fresh_lab(arp_lab: nsutil_arp.Lab) -> nsutil_arp.Lab:
    """The responder tests' lab with an empty client neighbour table."""
    nsexec(arp_lab.client, "ip", "neigh", "flush", "dev", CLIENT_IF, "nud", "all")
    nsexec(arp_lab.client, "ip", "-6", "neigh", "flush", "dev", CLIENT_IF, "nud", "all")
    return arp_lab


@pytest.fixture
def start(arp_lab: nsutil_arp.Lab) -> Iterator[Start]:
    """Start responders in the lab's node namespaces; stopped after the test."""
    started: list[ResponderProcess] = []

    def _start(
        ns: str,
        addresses: tuple[IPv4Address | IPv6Address, ...] = (nsutil_arp.VIP, nsutil_arp.VIP6),
        **kw: Any,
    ) -> ResponderProcess:
        started.append(ResponderProcess(ns, addresses, **kw))
        return started[-1]

    try:
        yield _start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def responders(fresh_lab: nsutil_arp.Lab, start: Start) -> list[ResponderProcess]:
    """A responder on every node of the fresh lab (default addresses)."""
    return [start(ns) for ns in fresh_lab.nodes]


# ------------------------------------------------------------------ XDP program tests


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace of the XDP program tests' own, with the veth pair x0/x1 up."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"the XDP backend must be available for these tests: {reason}")
    with netns_group("x") as names:
        ns = names["x"]
        ns_run(ns, "ip", "link", "add", "x0", "type", "veth", "peer", "name", "x1")
        ns_run(ns, "ip", "link", "set", "x0", "up")
        ns_run(ns, "ip", "link", "set", "x1", "up")
        yield ns


@pytest.fixture
def pin_dir(netns: str, bpf_root: Path) -> Iterator[Path]:
    """A fresh pin directory for ``netns`` in the session's BPF filesystem, emptied after."""
    assert is_bpffs(bpf_root)
    d = bpf_root / f"{netns}-pins"
    yield d
    for p in sorted(d.glob("*")) if d.exists() else []:
        p.unlink()
    if d.exists():
        d.rmdir()
