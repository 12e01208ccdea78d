"""The simulate and whohas commands: the JSON contract and error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multihost.cli import main

BRIEF = ["--members", "A,B,C,D", "--event", "fail:D", "--event", "fail:C", "--event", "recover:D"]


def run_json(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict[str, object]:
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result: dict[str, object] = json.loads(out)
    return result


def test_simulate_reproduces_the_worked_example(capsys: pytest.CaptureFixture[str]) -> None:
    got = run_json(capsys, ["simulate", *BRIEF])
    assert got == {
        "buckets": 40320,
        "table": "factorial-8",
        "slots": {"A": 0, "B": 1, "C": 2, "D": 3},
        "weights": {"A": 1, "B": 1, "C": 1, "D": 1},
        "steps": [
            {
                "event": "start",
                "live": ["A", "B", "C", "D"],
                "shares": {"A": "1/4", "B": "1/4", "C": "1/4", "D": "1/4"},
                "moved": "0",
                "transfers": [],
            },
            {
                "event": "fail D",
                "live": ["A", "B", "C"],
                "shares": {"A": "1/3", "B": "1/3", "C": "1/3"},
                "moved": "1/4",
                "transfers": [
                    {"from": "D", "to": "A", "share": "1/12"},
                    {"from": "D", "to": "B", "share": "1/12"},
                    {"from": "D", "to": "C", "share": "1/12"},
                ],
            },
            {
                "event": "fail C",
                "live": ["A", "B"],
                "shares": {"A": "1/2", "B": "1/2"},
                "moved": "1/3",
                "transfers": [
                    {"from": "C", "to": "A", "share": "1/6"},
                    {"from": "C", "to": "B", "share": "1/6"},
                ],
            },
            {
                "event": "recover D",
                "live": ["A", "B", "D"],
                "shares": {"A": "1/3", "B": "1/3", "D": "1/3"},
                "moved": "1/3",
                "transfers": [
                    {"from": "A", "to": "D", "share": "1/6"},
                    {"from": "B", "to": "D", "share": "1/6"},
                ],
            },
        ],
    }


def test_simulate_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *BRIEF]) == 0
    out = capsys.readouterr().out
    assert "== fail C: live A,B" in out
    assert "C -> A: 1/6" in out


def test_whohas(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["whohas", "--members", "A,B,C,D", "--live", "A,B,C", "--seed", "0x5eed1234"]
    got = run_json(capsys, [*args, "--flow", "198.18.0.2:40000-198.18.0.100:80"])
    # bucket 27102 (golden); with D dead, 27102 // 5040 = 5 -> ordering starts with slot 5
    assert got["bucket"] == 27102
    assert got["buckets"] == 40320
    assert got["owner"] in {"A", "B", "C"}
    v6 = run_json(capsys, [*args, "--flow", "[2001:db8::1]:40000-[2001:db8::100]:80"])
    assert v6["bucket"] == 33768


def test_whohas_agrees_with_engine(capsys: pytest.CaptureFixture[str]) -> None:
    from multihost.assignment import assign
    from multihost.flowhash import flow_bucket, parse_flow

    b = flow_bucket(parse_flow("198.18.0.9:1234-198.18.0.100:80"), 40320, 7)
    owner = assign({0, 2}).owner(b)
    got = run_json(
        capsys,
        [
            "whohas",
            "--members",
            "A,B,C",
            "--live",
            "A,C",
            "--seed",
            "7",
            "--flow",
            "198.18.0.9:1234-198.18.0.100:80",
        ],
    )
    assert got["owner"] == "ABC"[owner or 0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--members", "A,B", "--event", "fail:Z"], "unknown member 'Z'"),
        (
            ["simulate", "--members", "A,B", "--event", "fail:A", "--event", "fail:A"],
            "A is already failed",
        ),
        (["simulate", "--members", "A,B", "--event", "recover:A"], "A is not failed"),
        (
            ["simulate", "--members", ",".join(chr(65 + i) for i in range(17))],
            "17 members given, at most 16",
        ),
        (["simulate", "--members", "A,A"], "listed twice"),
        (["simulate", "--members", "A", "--event", "explode:A"], "fail:NAME or recover:NAME"),
        (["whohas", "--members", "A,B", "--seed", "1", "--flow", "1.2.3.4-5"], "flow '1.2.3.4-5'"),
        (
            [
                "whohas",
                "--members",
                "A,B",
                "--live",
                "C",
                "--seed",
                "1",
                "--flow",
                "198.18.0.1:1-198.18.0.2:2",
            ],
            "--live: unknown member 'C'",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("multihost: error: ")
    assert message in err


def test_console_script_exit_status() -> None:
    exe = Path(sys.executable).parent / "multihost"
    if not exe.exists():
        pytest.skip("console script not installed (run `make setup`)")
    bad = subprocess.run(
        [str(exe), "whohas", "--members", "A", "--seed", "zz", "--flow", "x"],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=False,
    )
    assert bad.returncode == 2
    assert "seed 'zz'" in bad.stderr
