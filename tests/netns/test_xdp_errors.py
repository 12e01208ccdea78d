"""Bad input for the XDP backend: each a clear error naming the cause, never a half-attached
state; with ``dataplane = "auto"`` the nft backend instead."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from multihost.dataplane import backend, xdpattach, xdpobject
from multihost.dataplane.ruleset import GroupSpec, RulesetSpec
from multihost.dataplane.xdp import XdpDataplane
from multihost.dataplane.xdpobject import XdpError
from tests.netns.nsutil import netns_group, ns_run

SPEC = RulesetSpec(40320, 1, (GroupSpec("web", (ipaddress.ip_address("198.18.0.100"),)),))
#: The real program with its first bounds check removed: the verifier must refuse it.
CHECK = """	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))"""


@pytest.fixture
def ns() -> Iterator[str]:
    with netns_group("e") as names:
        n = names["e"]
        ns_run(n, "ip", "link", "add", "e0", "type", "veth", "peer", "name", "e1")
        for dev in ("e0", "e1"):
            ns_run(n, "ip", "link", "set", dev, "up")
        yield n


@pytest.fixture
def pins(ns: str, bpf_root: Path) -> Iterator[Path]:
    d = bpf_root / f"{ns}-pins"
    yield d
    xdpattach.unpin(d)


def _no_xdp(ns: str, dev: str) -> bool:
    return "xdp" not in ns_run(ns, "ip", "link", "show", dev).stdout


def test_missing_object_is_named_and_auto_falls_back(ns: str, pins: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nothing.o"
    with pytest.raises(XdpError, match=r"nothing\.o is missing: build it with `make setup`"):
        XdpDataplane(SPEC, "e0", pins, netns=ns, obj=missing).install({})
    with pytest.raises(XdpError, match=r'dataplane = "xdp" cannot run here: .*missing'):
        backend.start(SPEC, {}, choice="xdp", interface="e0", pins=pins, netns=ns, obj=missing)
    got = backend.start(SPEC, {}, choice="auto", interface="e0", pins=pins, netns=ns, obj=missing)
    try:
        assert got.backend.backend == "nft"
        assert got.reason.startswith("auto: xdp unavailable:") and "missing" in got.reason
    finally:
        got.backend.remove()
        got.backend.close()
    assert _no_xdp(ns, "e0") and not pins.exists()


def test_stale_object_is_refused(ns: str, pins: Path, tmp_path: Path) -> None:
    stale = tmp_path / "stale.o"
    stale.write_bytes(
        xdpobject.OBJECT.read_bytes().replace(xdpobject.build_id().encode(), b"0" * 64)
    )
    with pytest.raises(XdpError, match=r"stale.*make setup"):
        XdpDataplane(SPEC, "e0", pins, netns=ns, obj=stale).install({})
    assert _no_xdp(ns, "e0") and not pins.exists()


@pytest.mark.skipif(shutil.which("clang") is None, reason="needs clang (make setup installs it)")
def test_verifier_rejection_carries_the_log(ns: str, pins: Path, tmp_path: Path) -> None:
    text = xdpobject.SOURCE.read_text()
    assert CHECK in text
    src = tmp_path / "bad.c"
    src.write_text(text.replace(CHECK, "\tif (eth->h_proto == bpf_htons(ETH_P_IP))"))
    obj = tmp_path / "bad.o"
    multiarch = subprocess.run(
        ["gcc", "-dumpmachine"], capture_output=True, text=True, check=True
    ).stdout
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{multiarch.strip()}",
         f"-I{xdpobject.BPF_DIR}", f'-DMH_BUILD_ID="{xdpobject.build_id()}"', "-c", str(src), "-o",
         str(obj)],
        check=True,
    )  # fmt: skip
    with pytest.raises(XdpError, match=r"the kernel refused the XDP program: .*(invalid|R\d)"):
        XdpDataplane(SPEC, "e0", pins, netns=ns, obj=obj).install({})
    assert _no_xdp(ns, "e0") and not pins.exists()
    got = backend.start(SPEC, {}, choice="auto", interface="e0", pins=pins, netns=ns, obj=obj)
    try:
        assert got.backend.backend == "nft" and "refused" in got.reason
    finally:
        got.backend.remove()
        got.backend.close()


def test_interface_without_native_xdp(ns: str, pins: Path) -> None:
    # loopback has no native XDP: forcing native fails with the kernel's reason
    with pytest.raises(XdpError, match="cannot attach XDP to 'lo': native:"):
        XdpDataplane(SPEC, "lo", pins, netns=ns, mode="native").install({})
    assert _no_xdp(ns, "lo") and not pins.exists()
    with pytest.raises(XdpError, match="interface 'nope0' does not exist"):
        XdpDataplane(SPEC, "nope0", pins, netns=ns).install({})


def test_kernel_without_btf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(xdpobject, "BTF_PATH", tmp_path / "no-vmlinux")
    reason = xdpobject.unavailable_reason()
    assert reason is not None and "no BTF" in reason
