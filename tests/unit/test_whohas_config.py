"""whohas/simulate --config: the configured slots, seed and hash mode, the agent's live view.

The reference is the ruleset the agent would program: for every live subset of a 4-node
cluster with non-contiguous slots, each node's rendered nft script (its owned-bucket map and
the jhash rule) is evaluated for 10,000 random flows; exactly one node must accept each
flow, and it must be the owner whohas names.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import random
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multihost import preflight
from multihost.cli import main
from multihost.cli.groupsel import from_config
from multihost.cli.whohas import lookup
from multihost.config import Config, load_config
from multihost.dataplane.ruleset import GroupBuckets, bucket_map
from multihost.dataplane.rulesettables import render_owned_table
from multihost.flowhash import Flow, jhash, reciprocal_scale
from multihost.ownership import bucket_owner, targets

CONFIG = """\
[cluster]
name = "c1"
interface = "eth0"
multicast_group = "239.192.0.1"
key_file = "key"
hash_seed = "0x1badcafe"
control_socket = "{socket}"

[[node]]
name = "A"
address = "198.18.0.11"
slot = 1
[[node]]
name = "B"
address = "198.18.0.12"
slot = 3
[[node]]
name = "C"
address = "198.18.0.13"
slot = 4
[[node]]
name = "D"
address = "198.18.0.14"
slot = 6

[[traffic_ip_group]]
name = "web"
addresses = ["198.18.0.100"]
members = ["A", "B", "C", "D"]

[[traffic_ip_group]]
name = "dns"
addresses = ["198.18.0.53"]
members = ["B", "D"]
hash = "source-ip"
"""

# members B,D of a 4-node cluster at slots 0..3: the case of issue 12
PAIR = """\
[cluster]
name = "c2"
interface = "eth0"
multicast_group = "239.192.0.1"
key_file = "key"
hash_seed = 7
[[node]]
name = "A"
address = "198.18.0.11"
slot = 0
[[node]]
name = "B"
address = "198.18.0.12"
slot = 1
[[node]]
name = "C"
address = "198.18.0.13"
slot = 2
[[node]]
name = "D"
address = "198.18.0.14"
slot = 3
[[traffic_ip_group]]
name = "web"
addresses = ["198.18.0.100"]
members = ["B", "D"]
"""


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "multihost.toml"
    p.write_text(CONFIG.format(socket=tmp_path / "agent.sock"))
    return p


def subsets(names: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for n in range(len(names) + 1):
        yield from itertools.combinations(names, n)


_RULE = re.compile(
    r"meta pkttype set jhash (?P<fields>.+?) mod (?P<mod>\d+) seed (?P<seed>0x[0-9a-f]+)"
    r" map @(?P<map>\w+)"
)


class RenderedNode:
    """One node's rendered owned table, evaluated for TCP/IPv4 flows like the kernel."""

    def __init__(self, cfg: Config, node: str, live: tuple[str, ...], group: str) -> None:
        spec = preflight.ruleset_spec(cfg)
        state = {g: GroupBuckets(owned=b) for g, b in targets(cfg, node, live).items()}
        text = render_owned_table(spec, state)
        g = spec.group(group)
        body = text.split(f"map {bucket_map(g)} {{", 1)[1].split("\n\t}", 1)[0]
        self.accepts = {int(k) for k, v in re.findall(r"(\d+) : (\w+)", body) if v == "host"}
        rules = [m for m in _RULE.finditer(text) if m["map"] == bucket_map(g)]
        # the port rule for IPv4 (its fields mention th sport / th dport when hashed)
        self.rule = max(rules, key=lambda m: len(m["fields"]))

    def key(self, flow: Flow) -> bytes:
        fields = {
            "ip saddr": flow.saddr.packed,
            "ip daddr": flow.daddr.packed,
            "th sport": flow.sport.to_bytes(2, "big") + b"\0\0",  # nft pads to 32 bits
            "th dport": flow.dport.to_bytes(2, "big") + b"\0\0",
        }
        return b"".join(fields[f.strip()] for f in self.rule["fields"].split("."))

    def bucket(self, flow: Flow) -> int:
        # the rendered rule is the same text on every node and live set: hash once per rule
        memo = (self.rule["fields"], self.rule["seed"], self.rule["mod"], flow)
        if memo not in _BUCKETS:
            h = jhash(self.key(flow), int(self.rule["seed"], 16))
            _BUCKETS[memo] = reciprocal_scale(h, int(self.rule["mod"]))
        return _BUCKETS[memo]


_BUCKETS: dict[tuple[str, str, str, Flow], int] = {}


def random_flows(n: int, seed: int, daddr: str) -> list[Flow]:
    rnd = random.Random(seed)
    return [
        Flow(
            ipaddress.IPv4Address(rnd.getrandbits(32)),
            rnd.randrange(1, 65536),
            ipaddress.IPv4Address(daddr),
            rnd.choice((80, 443, rnd.randrange(1, 65536))),
            "tcp",
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("group", ["web", "dns"])
def test_whohas_config_equals_the_programmed_ruleset(cfg_path: Path, group: str) -> None:
    cfg = load_config(cfg_path)
    g = from_config(str(cfg_path), group)
    assert g.slots == {m: cfg.slots[m] for m in g.members}
    daddr = "198.18.0.100" if group == "web" else "198.18.0.53"
    flows = random_flows(10_000, 12, daddr)
    names = tuple(n.name for n in cfg.nodes)
    for live in subsets(names):
        nodes = {n: RenderedNode(cfg, n, live, group) for n in names}
        for flow in flows:
            bucket, owner = lookup(g, live, flow)
            accepting = [n for n, r in nodes.items() if r.bucket(flow) in r.accepts]
            assert all(r.bucket(flow) == bucket for r in nodes.values())
            assert accepting == ([] if owner is None else [owner]), (live, flow)


def test_whohas_config_cli_matches_for_sampled_flows(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(cfg_path)
    names = tuple(n.name for n in cfg.nodes)
    for live in subsets(names):
        if not live:
            continue
        nodes = {n: RenderedNode(cfg, n, live, "web") for n in names}
        for flow in random_flows(5, len(live), "198.18.0.100"):
            text = f"{flow.saddr}:{flow.sport}-{flow.daddr}:{flow.dport}"
            args = ["whohas", "--config", str(cfg_path), "--live", ",".join(live)]
            assert main([*args, "--flow", text, "--json"]) == 0
            got = json.loads(capsys.readouterr().out)
            accepting = [n for n, r in nodes.items() if r.bucket(flow) in r.accepts]
            assert [got["owner"]] == accepting
            assert got["slot"] == cfg.slots[got["owner"]]
            assert got["group"] == "web" and got["live_source"] == "--live"
            assert got["seed"] == "0x1badcafe" and got["hash"] == "4-tuple"


def test_regression_members_b_d_of_four(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: the position in --members is not the slot; 26,880 buckets differed."""
    p = tmp_path / "pair.toml"
    p.write_text(PAIR)
    cfg = load_config(p)
    slots = cfg.slots
    configured = [bucket_owner(slots, ("B", "D"), ("B", "D"), b) for b in range(40320)]
    positional = [bucket_owner({"B": 0, "D": 1}, ("B", "D"), ("B", "D"), b) for b in range(40320)]
    assert sum(a != b for a, b in zip(configured, positional, strict=True)) == 26_880
    # the agent's targets agree with the configured slots
    t = {n: targets(cfg, n, ["B", "D"])["web"] for n in ("B", "D")}
    assert all((b in t["B"]) == (o == "B") for b, o in enumerate(configured))
    # find a flow where the old answer was wrong; whohas --config and --slots get it right
    flow = next(
        f
        for f in random_flows(1000, 3, "198.18.0.100")
        if configured[lookup(from_config(str(p), None), ("B", "D"), f)[0]]
        != positional[lookup(from_config(str(p), None), ("B", "D"), f)[0]]
    )
    text = f"{flow.saddr}:{flow.sport}-{flow.daddr}:{flow.dport}"
    bucket = lookup(from_config(str(p), None), ("B", "D"), flow)[0]
    assert main(["whohas", "--config", str(p), "--live", "B,D", "--flow", text, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["owner"] == configured[bucket]
    explicit = ["whohas", "--members", "B,D", "--slots", "1,3", "--seed", "7", "--flow", text]
    assert main([*explicit, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["owner"] == configured[bucket]
    old = ["whohas", "--members", "B,D", "--seed", "7", "--flow", text, "--json"]
    assert main(old) == 0  # the old form still works (and still means slots 0,1)
    assert json.loads(capsys.readouterr().out)["owner"] == positional[bucket]


def test_simulate_config_uses_configured_slots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "pair.toml"
    p.write_text(PAIR)
    assert main(["simulate", "--config", str(p), "--event", "fail:D", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["slots"] == {"B": 1, "D": 3} and got["group"] == "web"
    assert got["steps"][0]["shares"] == {"B": "1/2", "D": "1/2"}
    assert got["steps"][1]["live"] == ["B"] and got["steps"][1]["moved"] == "1/2"
    # same as --members with --slots; differs in which buckets from positional slots
    assert main(["simulate", "--members", "B,D", "--slots", "1,3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["slots"] == {"B": 1, "D": 3}
    assert main(["simulate", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "members (at slot) B@1,D@3" in out


class FakeAgent:
    """A control socket answering ``status`` like the agent (one reply per connection)."""

    def __init__(self, path: Path, status: dict[str, Any]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                self.requests.append(json.loads(buf))
                conn.sendall(json.dumps({"ok": True, **self.status}).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


def agent_status(cluster: str, live_web: list[str]) -> dict[str, Any]:
    return {
        "node": "B",
        "cluster": cluster,
        "live": live_web,
        "groups": {
            "web": {"members": ["A", "B", "C", "D"], "hash": "4-tuple", "live": live_web},
            "dns": {"members": ["B", "D"], "hash": "source-ip", "live": ["B"]},
        },
    }


def test_whohas_without_live_asks_the_agent(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = FakeAgent(cfg_path.parent / "agent.sock", agent_status("c1", ["A", "C"]))
    try:
        flow = "198.18.7.9:40000-198.18.0.100:80"
        assert main(["whohas", "--config", str(cfg_path), "--flow", flow, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert agent.requests == [{"cmd": "status"}]
        assert got["live_source"] == "agent" and got["agent_node"] == "B"
        assert got["live"] == ["A", "C"] and got["owner"] in {"A", "C"}
        assert main(["whohas", "--config", str(cfg_path), "--live", "A,C", "--flow", flow]) == 0
        explicit = capsys.readouterr().out
        assert main(["whohas", "--config", str(cfg_path), "--flow", flow]) == 0
        text = capsys.readouterr().out
        assert "from the agent on node B" in text
        assert text.splitlines()[0] == explicit.splitlines()[0]  # same bucket and owner
    finally:
        agent.close()


def test_whohas_agent_of_another_cluster_is_refused(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = FakeAgent(cfg_path.parent / "agent.sock", agent_status("other", ["A"]))
    try:
        flow = "198.18.7.9:40000-198.18.0.100:80"
        assert main(["whohas", "--config", str(cfg_path), "--flow", flow, "--json"]) == 1
        got = json.loads(capsys.readouterr().out)
        assert got["ok"] is False and got["code"] == 1 and "cluster 'other'" in got["error"]
    finally:
        agent.close()


def test_whohas_no_agent_is_a_clear_error(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = "198.18.7.9:40000-198.18.0.100:80"
    assert main(["whohas", "--config", str(cfg_path), "--flow", flow]) == 1
    err = capsys.readouterr().err
    assert err.startswith("multihost: error: no agent control socket at ")
    assert "pass --live" in err
    assert main(["whohas", "--config", str(cfg_path), "--flow", flow, "--json"]) == 1
    cap = capsys.readouterr()
    got = json.loads(cap.out)
    assert got == {"ok": False, "error": got["error"], "code": 1}
    assert "is the agent running" in got["error"]


def test_group_is_chosen_by_destination(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["whohas", "--config", str(cfg_path), "--live", "A,B,C,D", "--json"]
    assert main([*base, "--flow", "198.18.1.1:5-198.18.0.53:53"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["group"] == "dns" and got["hash"] == "source-ip" and got["owner"] in {"B", "D"}
    assert main([*base, "--group", "web", "--flow", "198.18.1.1:5-198.18.0.53:53"]) == 2
    assert "is a traffic IP of group 'dns'" in json.loads(capsys.readouterr().out)["error"]
    assert main([*base, "--flow", "198.18.1.1:5-198.18.0.99:53"]) == 2
    assert "pass --group NAME" in json.loads(capsys.readouterr().out)["error"]
    assert main([*base, "--group", "nope", "--flow", "198.18.1.1:5-198.18.0.100:53"]) == 2
    assert "no such group" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--members", "A,B"], "--config and --members exclude each other"),
        (["--seed", "1"], "--seed comes from the configuration"),
        (["--slots", "1,2"], "--slots comes from the configuration"),
        (["--hash", "3-tuple"], "--hash comes from the configuration"),
        (["--live", "A,Z"], "--live: unknown member 'Z'"),
    ],
)
def test_whohas_config_conflicts(
    cfg_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = ["whohas", "--config", str(cfg_path), "--flow", "1.2.3.4:1-198.18.0.100:80"]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--members", "B,D", "--slots", "1"], "1 slots for 2 members"),
        (["--members", "B,D", "--slots", "1,1"], "slot 1 is given twice"),
        (["--members", "B,D", "--slots", "1,16"], "slot 16 is outside 0..15"),
        (["--members", "B,D", "--slots", "x,y"], "expected slot numbers"),
        (["--members", "B,D"], "--seed is required with --members"),
        ([], "either --config FILE or --members"),
    ],
)
def test_whohas_members_form_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    seedless = [*args, "--flow", "1.2.3.4:1-198.18.0.100:80"]
    if "--slots" in args:
        seedless += ["--seed", "1"]
    assert main(["whohas", *seedless]) == 2
    assert message in capsys.readouterr().err


def test_whohas_a_return_group_names_the_requests_owner(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A back end's reply (``--group <return group>``, flow back end -> client) has the
    bucket and owner of the client's request to the front group."""
    example = str(Path(__file__).parents[2] / "contrib" / "multihost.example.toml")
    rng = random.Random(13)
    for _ in range(50):
        client = f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        cport, live = rng.randrange(1, 65536), rng.choice(["A,B,C", "A,C", "B"])
        out = []
        for group, flow in (
            ("app", f"{client}:{cport}-198.18.0.101:80"),
            (
                "app_return",
                f"198.19.0.{rng.randrange(2, 250)}:{rng.randrange(1, 65536)}-{client}:{cport}",
            ),
        ):
            argv = ["whohas", "--config", example, "--group", group, "--live", live]
            assert main([*argv, "--flow", flow, "--json"]) == 0
            out.append(json.loads(capsys.readouterr().out))
        assert (out[0]["bucket"], out[0]["owner"]) == (out[1]["bucket"], out[1]["owner"])
        assert out[1]["hash"] == "destination-ip-port" and out[1]["group"] == "app_return"
    g = from_config(example, "app_return")
    assert g.front == "app" and g.members == ("A", "B", "C")
