"""The --json contract: every command that takes --json prints exactly one JSON object on
stdout, also on error ({"ok": false, "error": "...", "code": N} with N the exit status);
the human message goes to stderr as one ``multihost: error: ...`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from multihost.cli import build_parser, main
from multihost.cli.docgen import walk

JSON_COMMANDS = [
    c.path
    for c in walk(build_parser())
    if c.path and any("--json" in a.option_strings for a in c.parser._actions)
]
PREFIX = "mhOjson-"  # no lab with this prefix exists; nothing is built


def one_object(out: str) -> dict[str, Any]:
    assert out.count("\n") == 1 and out.endswith("\n"), out
    obj = json.loads(out)
    assert isinstance(obj, dict)
    return obj


def test_the_commands_with_json_are_found() -> None:
    names = {" ".join(p) for p in JSON_COMMANDS}
    assert {"simulate", "whohas", "check-config", "status", "drain", "undrain"} <= names
    assert {"lab up", "lab status", "lab probe", "lab demo", "lab chaos"} <= names


@pytest.mark.parametrize("path", JSON_COMMANDS, ids=[" ".join(p) for p in JSON_COMMANDS])
def test_unknown_option_is_a_json_error(
    capsys: pytest.CaptureFixture[str], path: tuple[str, ...]
) -> None:
    assert main([*path, "--no-such-option", "--json"]) == 2
    cap = capsys.readouterr()
    got = one_object(cap.out)
    assert got["ok"] is False and got["code"] == 2
    # argparse names a missing required argument first, else the unknown option
    assert "--no-such-option" in got["error"] or "are required" in got["error"]
    assert cap.err == f"multihost: error: {got['error']}\n"


def test_parse_error_before_json_flag_is_json_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "nosuchcommand"]) == 2
    got = one_object(capsys.readouterr().out)
    assert "invalid choice: 'nosuchcommand'" in got["error"]


FLOW = "198.18.0.2:40000-198.18.0.100:80"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["simulate", "--members", "A,B", "--event", "fail:Z"], 2, "unknown member 'Z'"),
        (["simulate", "--members", "A", "--event", "boom"], 2, "fail:NAME or recover:NAME"),
        (["simulate"], 2, "either --config FILE or --members"),
        (["whohas", "--members", "A", "--seed", "zz", "--flow", FLOW], 2, "seed 'zz'"),
        (["whohas", "--members", "A", "--seed", "1", "--flow", "x"], 2, "flow 'x'"),
        (["whohas", "--config", "/nonexistent.toml", "--flow", FLOW], 2, "cannot read"),
        (["whohas", "--members", "A"], 2, "required: --flow"),
        (["status", "--socket", "/nonexistent.sock"], 1, "no agent control socket"),
        (["status", "--config", "/nonexistent.toml"], 2, "cannot read"),
        (["drain", "--socket", "/nonexistent.sock"], 1, "no agent control socket"),
        (["drain", "--socket", "/nonexistent.sock", "--wait"], 1, "no agent control socket"),
        (["undrain", "B", "--socket", "/nonexistent.sock"], 1, "no agent control socket"),
        (["lab", "fail", "D", "--prefix", PREFIX], 1, "no lab with prefix"),
        (["lab", "recover", "D", "--prefix", PREFIX], 1, "no lab with prefix"),
        (["lab", "drain", "B", "--prefix", PREFIX], 1, "no lab with prefix"),
        (["lab", "probe", "--prefix", PREFIX], 1, "no lab with prefix"),
        (["lab", "set-live", "A", "--prefix", PREFIX], 1, "no lab with prefix"),
        (["lab", "down", "--prefix", PREFIX], 1, "no lab with prefix"),
        (["lab", "chaos", "--nodes", "2", "--prefix", PREFIX], 2, "--nodes 2 is outside"),
        (["lab", "up", "--nodes", "99", "--prefix", PREFIX], 2, "99"),
    ],
)
def test_bad_input_is_one_json_object(
    capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    assert main([*args, "--json"]) == code
    cap = capsys.readouterr()
    got = one_object(cap.out)
    assert got == {"ok": False, "error": got["error"], "code": code}
    assert message in got["error"]
    assert cap.err == f"multihost: error: {got['error']}\n"


def test_without_json_errors_go_to_stderr_only(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["drain", "--socket", "/nonexistent.sock"], ["status", "--socket", "/x.sock"]):
        assert main(args) == 1
        cap = capsys.readouterr()
        assert cap.out == ""
        assert cap.err.startswith("multihost: error: ") and cap.err.count("\n") == 1


def test_check_config_error_keeps_its_shape_and_adds_the_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\n")
    assert main(["check-config", str(bad), "--json"]) == 2
    got = one_object(capsys.readouterr().out)
    assert got["valid"] is False and got["ok"] is False and got["code"] == 2
    assert set(got["error"]) == {"file", "key", "reason"}
    assert got["error"]["key"] == "cluster.name"


def test_lab_status_without_lab_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "status", "--prefix", PREFIX, "--json"]) == 1
    assert one_object(capsys.readouterr().out) == {"prefix": PREFIX, "up": False}


def test_console_script_json_error() -> None:
    exe = Path(sys.executable).parent / "multihost"
    if not exe.exists():
        pytest.skip("console script not installed (run `make setup`)")
    r = subprocess.run(
        [str(exe), "drain", "--socket", "/nonexistent.sock", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=False,
    )
    assert r.returncode == 1
    assert json.loads(r.stdout)["code"] == 1
    assert r.stderr.startswith("multihost: error: no agent control socket")
