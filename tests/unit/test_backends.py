"""[[backend]] tables: parsing, the rendered plan (golden text and JSON), and the
``backend-routes`` / ``check-config`` commands without root.  Every validation error (file,
key, value) is in ``test_backends_invalid.py``; the configurations in backend_configs.py.

Regenerate the golden files after an intended change with
``MULTIHOST_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_backends.py`` and review the diff.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from multihost.backendplan import AddressStep, RouteStep, RuleStep, plan, render_json, render_text
from multihost.backends import find_backend
from multihost.cli import main
from multihost.config import ConfigError, load_config, parse_config
from tests.unit.backend_configs import BASE, V6_CFG

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("MULTIHOST_UPDATE_GOLDEN") == "1"
EXAMPLE = Path(__file__).parents[2] / "contrib" / "multihost.example.toml"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with MULTIHOST_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs; MULTIHOST_UPDATE_GOLDEN=1 regenerates it"


def test_parse_defaults_and_slot_order() -> None:
    cfg = parse_config(BASE, "b.toml")
    (b,) = cfg.backends
    assert (b.name, b.interface, b.table_base, b.rule_priority_base) == ("db1", "eth1", 100, 1000)
    assert b.family == 4
    got = [(p.node, p.slot, str(p.address), str(p.gateway), p.table, p.priority) for p in b.paths]
    assert got == [
        ("A", 0, "198.19.0.101/24", "198.19.0.1", 100, 1000),
        ("C", 2, "198.19.0.103/24", "198.19.0.3", 102, 1002),
        ("B", 5, "198.19.0.102/24", "198.19.0.2", 105, 1005),
    ]


def test_no_backends_is_the_old_configuration() -> None:
    text = "\n".join(
        line
        for line in BASE.split("[[backend]]", maxsplit=1)[0].splitlines()
        if "backend_gateway" not in line
    )
    cfg = parse_config(text)
    assert cfg.backends == ()
    # back ends and gateways do not decide ownership: the heartbeat digest ignores them
    assert cfg.digest() == parse_config(BASE).digest()


def test_example_configuration_has_a_backend() -> None:
    (b,) = load_config(EXAMPLE).backends
    assert b.name == "db1" and [p.table for p in b.paths] == [100, 101, 102]


def test_two_families_two_backends() -> None:
    cfg = parse_config(V6_CFG)
    b6 = find_backend(cfg.backends, "db6", cfg.source)
    assert b6.family == 6
    assert [(p.node, str(p.gateway), p.table, p.priority) for p in b6.paths] == [
        ("A", "2001:db8:19::1", 7600, 20000),
        ("C", "2001:db8:19::3", 7602, 20002),
        ("B", "2001:db8:19::2", 7605, 20005),
    ]
    with pytest.raises(
        ConfigError, match=r"backend: no back end named 'x' \(known: 'db1', 'db6'\)"
    ):
        find_backend(cfg.backends, "x", cfg.source)


def test_check_config_lists_backends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(BASE)
    assert main(["check-config", str(good), "--no-key", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["backends"]["db1"]["nodes"]["B"] == {
        "address": "198.19.0.102/24",
        "gateway": "198.19.0.2",
        "table": 105,
        "priority": 1005,
    }
    assert main(["check-config", str(good), "--no-key"]) == 0
    assert "198.19.0.102/24 via B's 198.19.0.2 (table 105, rule priority 1005)" in (
        capsys.readouterr().out
    )


# --------------------------------------------------------------------------------- the plan
def test_plan_order_and_steps() -> None:
    pl = plan(parse_config(BASE).backends[0])
    kinds = [(type(s), s.node) for s in pl.steps]
    assert kinds == [(k, n) for n in ("A", "C", "B") for k in (AddressStep, RouteStep, RuleStep)]
    assert pl.removal() == tuple(reversed(pl.steps))
    rule = pl.steps[-1]
    assert isinstance(rule, RuleStep)
    assert (rule.source, rule.table, rule.priority) == (
        ipaddress.ip_address("198.19.0.102"),
        105,
        1005,
    )


def test_golden_text_and_json() -> None:
    pl = plan(parse_config(BASE).backends[0])
    check_golden("backend_routes_apply.sh", render_text(pl))
    check_golden("backend_routes_remove.sh", render_text(pl, remove=True))
    check_golden("backend_routes.json", json.dumps(render_json(pl), indent=2) + "\n")
    b6 = find_backend(parse_config(V6_CFG).backends, "db6", "x")
    check_golden("backend_routes_v6.sh", render_text(plan(b6)))


def test_cli_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    assert main(["backend-routes", "--config", str(path), "--backend", "db1"]) == 0
    assert capsys.readouterr().out == (GOLDEN / "backend_routes_apply.sh").read_text()
    assert main(["backend-routes", "--config", str(path), "--backend", "db1", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    got = json.loads(out)
    assert got["ok"] is True and got["action"] == "plan"
    assert got["steps"] == json.loads((GOLDEN / "backend_routes.json").read_text())["steps"]
    assert "result" not in got["steps"][0] and "changed" not in got


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "nope"], "backend: no back end named 'nope' (known: 'db1')"),
        (["--backend", "db1", "--apply", "--remove"], "not allowed with argument"),
        ([], "the following arguments are required: --backend"),
    ],
)
def test_cli_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    assert main(["backend-routes", "--config", str(path), *args, "--json"]) == 2
    cap = capsys.readouterr()
    got = json.loads(cap.out)
    assert got == {"ok": False, "error": got["error"], "code": 2}
    assert message in got["error"]
    assert cap.err == f"multihost: error: {got['error']}\n"


def test_cli_missing_interface_is_an_operation_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("--apply needs root; without it the command refuses (exit 2) first")
    path = tmp_path / "c.toml"
    path.write_text(BASE.replace('interface = "eth1"', 'interface = "mhb-none0"'))
    assert main(["backend-routes", "--config", str(path), "--backend", "db1", "--apply"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "multihost: error: backend 'db1': no interface 'mhb-none0' on this host (backend "
        "'db1' interface); run --apply on the back end itself\n"
    )


def test_config_reference_documents_the_backend_keys() -> None:
    page = (Path(__file__).parents[2] / "docs" / "man" / "multihost.toml.5").read_text()
    for key in ("backend_gateway", "[[backend]]", "table_base", "rule_priority_base"):
        assert key in page, key
    assert "backend\\-routes" in page
