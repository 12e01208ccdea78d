"""Man pages and shell completion: generated from the parsers, complete, up to date."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from multihost import __version__
from multihost.cli import build_parser, main
from multihost.cli.docgen import bash, manpage, walk, zsh

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [c for c in walk(build_parser()) if c.path]
LAB = {c.path[1] for c in COMMANDS if len(c.path) == 2 and c.path[0] == "lab"}


def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen-docs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_files_are_up_to_date() -> None:
    stale = [
        str(p.relative_to(ROOT))
        for p, text in gen_docs().generated().items()
        if not p.exists() or p.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"out of date, run 'make docs': {stale}"


def test_manpage_has_every_command_and_option() -> None:
    page = manpage(build_parser(), __version__)
    assert page.startswith('.\\" Generated') and ".TH MULTIHOST 8" in page
    assert len(COMMANDS) > 20
    for c in COMMANDS:
        assert f".SS multihost {c.name.replace('-', chr(92) + '-')}\n" in page, c.name
        for a in c.parser._actions:
            for opt in a.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"\\fB{opt.replace('-', chr(92) + '-')}\\fR" in page, (c.name, opt)


def test_config_manpage_has_every_example_key() -> None:
    page = (ROOT / "docs" / "man" / "multihost.toml.5").read_text()
    for key in ("multicast_group", "hash_seed", "dead_after_ms", "max_drain_ms", "slot"):
        assert key.replace("-", "\\-") in page


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_manpage_renders_without_warnings(tmp_path: Path) -> None:
    for name in ("multihost.8", "multihost.toml.5"):
        r = subprocess.run(
            ["man", "--warnings", "-l", str(ROOT / "docs" / "man" / name)],
            capture_output=True,
            text=True,
            env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert "warning" not in r.stderr.lower(), r.stderr
        assert "multihost" in r.stdout


def test_completion_command_prints_the_generated_script(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["completion", "bash"]) == 0
    assert capsys.readouterr().out == bash(build_parser())
    assert main(["completion", "zsh"]) == 0
    assert "bashcompinit" in capsys.readouterr().out


def complete(words: list[str]) -> list[str]:
    script = bash(build_parser())
    cmd = (
        f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        "COMP_CWORD=$((${#COMP_WORDS[@]}-1)); COMPREPLY=(); _multihost\n"
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True)
    assert r.stderr == ""
    return [w for w in r.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["multihost", ""], {c.path[0] for c in COMMANDS if len(c.path) == 1}),
        (
            ["multihost", "lab", ""],
            {c.path[1] for c in COMMANDS if len(c.path) == 2 and c.path[0] == "lab"},
        ),
        (["multihost", "whohas", "--pro"], {"--proto"}),
        (["multihost", "whohas", "--proto", ""], {"tcp", "udp", "sctp", "icmp", "icmpv6"}),
        (["multihost", "whohas", "--seed", "1", "--h"], {"--help", "--hash"}),
        (["multihost", "lab", "up", "--switch", ""], {"snooping", "flood", "strict"}),
        (["multihost", "completion", ""], {"bash", "zsh"}),
    ],
)
def test_bash_completion(words: list[str], expected: set[str]) -> None:
    assert set(complete(words)) == expected


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_of_files(tmp_path: Path) -> None:
    f = tmp_path / "cluster.toml"
    f.write_text("")
    assert complete(["multihost", "check-config", str(tmp_path / "clu")]) == [str(f)]
    assert complete(["multihost", "whohas", "--config", str(tmp_path / "clu")]) == [str(f)]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_loads_the_completion(tmp_path: Path) -> None:
    script = tmp_path / "_multihost"
    script.write_text(zsh(build_parser()))
    r = subprocess.run(
        ["zsh", "-fc", f"source {script} 2>/dev/null; print -r -- ${{_comps[multihost]}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "_multihost" in r.stdout, (r.stdout, r.stderr)


def test_gen_docs_check_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = gen_docs()
    assert mod.main(["--check"]) == 0
    stale = tmp_path / "multihost.8"
    stale.write_text("old\n")
    monkeypatch.setattr(mod, "generated", lambda: {stale: "new\n"})
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    assert mod.main(["--check"]) == 1
    assert stale.read_text() == "old\n"
    assert mod.main([]) == 0
    assert stale.read_text() == "new\n"
