"""The command line: help everywhere, solve tables and JSON, one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import peftbench
from peftbench.cli import build_parser, main

REGISTRY = peftbench.get_registry()


@pytest.mark.parametrize("command", [[], ["methods"], ["plugins"], ["solve"], ["run"], ["report"], ["download"],
                                     ["predict"], ["export"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: peftbench" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "peftbench", "methods", "--json"], capture_output=True, text=True, check=True)
    names = {m["name"] for m in json.loads(out.stdout)}
    assert names == set(REGISTRY.methods)


def test_methods_json_fields(capsys):
    assert main(["methods", "--json"]) == 0
    for item in json.loads(capsys.readouterr().out):
        assert set(item) >= {"name", "knob", "inserts", "aliases", "plugin", "budgeted", "schedule_lr",
                             "in_default_grid", "reference"}
        assert item["inserts"], f"{item['name']} says nothing about what it inserts"
        method = peftbench.get_registry().method(item["name"])  # the registry the command listed
        assert (item["schedule_lr"], item["in_default_grid"], item["reference"]) == (
            method.schedule_lr, method.in_default_grid, method.reference)


def test_solve_every_registered_method_on_minilm(capsys):
    """Issue 2's 'done when': every method solved at 3% on MiniLM, verified by instantiation."""
    methods = ",".join(sorted(REGISTRY.methods))
    code = main(["solve", "--backbone", "minilm", "--methods", methods, "--budget", "3%", "--json"])
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert code == 0
    assert set(rows) == set(REGISTRY.methods)
    for name, row in rows.items():
        assert row["verified"] is True, name
        assert row["measured"] == row["params"]
        if row["target"] is not None and row["reachable"]:
            assert row["target"] == round(0.03 * 22_713_216)
    text_code = main(["solve", "--backbone", "minilm", "--methods", methods, "--budget", "3%", "--no-verify"])
    table = capsys.readouterr().out
    assert text_code == 0
    assert "| method" in table and "22,713,216 parameters without the task head" in table
    for name in REGISTRY.methods:
        assert f"| {name} " in table


@pytest.mark.parametrize("argv,message", [
    (["solve", "--methods", "lroa"], "unknown method 'lroa'"),
    (["solve", "--budget", "3"], "budget '3' is ambiguous"),
    (["solve", "--budget=-1%"], "budget '-1%' is out of range"),
    (["solve", "--budget", "150%"], "budget '150%' is out of range"),
    (["solve", "--budget", "abc"], "budget 'abc' is malformed"),
    (["solve", "--backbone", "/nonexistent/folder/x", "--no-verify"], "cannot load the config of backbone"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_parser_lists_every_command():
    text = build_parser().format_help()
    for command in ("methods", "plugins", "solve", "run", "report", "download", "predict", "export"):
        assert command in text


def test_methods_list_config_fields_with_type_default_and_description(capsys):
    assert main(["methods", "--json"]) == 0
    items = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    for name, item in items.items():
        fields = {f["name"]: f for f in item["config"]}
        assert set(fields) == set(REGISTRY.method(name).Config.model_fields), name
        for f in fields.values():
            assert set(f) == {"name", "type", "default", "description", "knob"}
            assert f["description"], f"{name}.{f['name']} has no description"
    lora = {f["name"]: f for f in items["lora"]["config"]}
    assert lora["r"] == {"name": "r", "type": "int", "default": 8, "description": "rank of B A (in every chosen layer unless layer_sizes)",
                         "knob": True}
    assert lora["targets"]["type"] == "list[str] | 'all-linear'" and lora["targets"]["default"] == ["q", "v"]
    assert {f["name"]: f["type"] for f in items["prefix"]["config"]}["hidden"] == "int | None"
    assert main(["methods", "prefix-tuning"]) == 0  # one method, by an alias
    out = capsys.readouterr().out
    assert out.startswith("prefix (plugin prefix): ")
    assert re.search(r"\| n \(knob\) +\| int +\| 10 ", out) and "virtual tokens (prefix length)" in out
    assert main(["methods", "lora", "--json"]) == 0
    assert [f["name"] for f in json.loads(capsys.readouterr().out)["config"] if f["knob"]] == ["r"]
    assert main(["methods", "lorra"]) == 2
    assert "unknown method 'lorra'" in capsys.readouterr().err
