"""``simulate`` and ``whohas`` with 12 and 16 members and with weights: exact shares and
moved fractions in --json, the table named."""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import pytest

from multihost.cli import main
from multihost.minwise import lcm_upto


def run_json(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict[str, Any]:
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result: dict[str, Any] = json.loads(out)
    return result


def names(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


@pytest.mark.parametrize("n", [12, 16])
def test_simulate_worked_example_style_exact(capsys: pytest.CaptureFixture[str], n: int) -> None:
    m = names(n)
    last, second = m[-1], m[-2]
    events = ["--event", f"fail:{last}", "--event", f"fail:{second}", "--event", f"recover:{last}"]
    got = run_json(capsys, ["simulate", "--members", ",".join(m), *events])
    assert got["buckets"] == lcm_upto(n)
    assert got["table"] == f"minwise-{n}"
    steps = got["steps"]
    assert isinstance(steps, list)
    expect_live = [n, n - 1, n - 2, n - 1]
    expect_moved = [Fraction(0), Fraction(1, n), Fraction(1, n - 1), Fraction(1, n - 1)]
    for step, live, moved in zip(steps, expect_live, expect_moved, strict=True):
        assert set(step["shares"].values()) == {f"1/{live}"}, step["event"]
        assert Fraction(step["moved"]) == moved, step["event"]
        # the failed member's share splits equally over the survivors (a recovery: back)
        transfers = step["transfers"]
        if step["event"] != "start":
            assert len(transfers) == (live if "fail" in step["event"] else live - 1)
            assert all(Fraction(t["share"]) * len(transfers) == moved for t in transfers)
    fail = steps[1]
    assert {t["from"] for t in fail["transfers"]} == {last}
    assert len(fail["transfers"]) == n - 1
    assert all(Fraction(t["share"]) == Fraction(1, n * (n - 1)) for t in fail["transfers"])
    back = steps[3]
    assert {t["to"] for t in back["transfers"]} == {last}


def test_simulate_weights(capsys: pytest.CaptureFixture[str]) -> None:
    got = run_json(
        capsys,
        ["simulate", "--members", "A,B,C", "--weights", "A=2", "--event", "fail:A"],
    )
    assert got["weights"] == {"A": 2, "B": 1, "C": 1}
    assert got["table"] == "factorial-8/weights-0:2,1:1,2:1"
    start, fail = got["steps"]
    assert start["shares"] == {"A": "1/2", "B": "1/4", "C": "1/4"}
    assert fail["shares"] == {"B": "1/2", "C": "1/2"} and fail["moved"] == "1/2"


def test_whohas_sixteen_members(capsys: pytest.CaptureFixture[str]) -> None:
    flow = "198.18.0.2:40000-198.18.0.100:80"
    args = ["whohas", "--members", ",".join(names(16)), "--seed", "1", "--flow", flow]
    got = run_json(capsys, args)
    assert got["buckets"] == 720720 and got["table"] == "minwise-16"
    assert set(got["shares"].values()) == {"1/16"}
    assert got["owner"] in names(16)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "A=0"], "weight 0 must be at least 1"),
        (["--weights", "A=9,B=8"], "the weights add up to 17; a table holds at most 16"),
        (["--weights", "Z=2"], "expected MEMBER=WEIGHT"),
    ],
)
def test_bad_weights(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["simulate", "--members", "A,B", *args]) == 2
    assert message in capsys.readouterr().err


def test_status_text_shows_the_table_and_weights() -> None:
    from multihost.cli.status import to_text

    st = {
        "node": "A",
        "slot": 0,
        "cluster": "big",
        "mode": "membership",
        "boot_id": "00",
        "uptime_s": 1.0,
        "live": ["A", "B"],
        "table": {
            "name": "factorial-8/weights-0:2,1:1",
            "slots": 2,
            "buckets": 40320,
            "sha256": "0" * 64,
            "weights": {"A": 2, "B": 1},
        },
        "groups": {},
    }
    text = to_text(st)
    assert "table factorial-8/weights-0:2,1:1: 40320 buckets over 2 slots; weights A=2, B=1" in text
