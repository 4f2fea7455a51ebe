"""The core's shape stays as the redesign left it (issue #12).

- no import cycle inside ``peftbench/`` (module- and function-level imports; ``TYPE_CHECKING``
  blocks aside);
- no file in ``peftbench/`` over 400 lines;
- no string literal in ``peftbench/`` naming a built-in method or the built-in plugin package:
  the core asks methods what it needs (``schedule_lr``, ``in_default_grid``, ``reference``,
  ``Injection.costs``), so adding a method touches ``plugins/`` and ``pyproject.toml`` only;
- run flags are declared once: every row of the flag table reaches ``--help``, the suite and
  the recorded command.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import peftbench

CORE = Path(peftbench.__file__).resolve().parent
MAX_LINES = 400
PLUGIN_PACKAGE = "peftbench_plugins"


def _modules() -> dict[str, Path]:
    out = {}
    for path in CORE.rglob("*.py"):
        rel = path.relative_to(CORE.parent)
        if "data" in rel.parts:  # the packaged data's build script is not the core
            continue
        name = ".".join(rel.with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                    (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                skip |= {id(sub) for sub in ast.walk(node)}
    return skip


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Core modules ``name`` imports anywhere in its body (module or function level)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c not in (name, "peftbench")}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_core():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []
    # the check sees function-level imports too: a planted cycle is found
    planted = {**graph, "peftbench.errors": graph["peftbench.errors"] | {"peftbench.budget"}}
    assert any("peftbench.errors" in c for c in _cycles(planted))


def test_no_core_file_over_the_limit():
    sizes = {str(path.relative_to(CORE.parent)): len(path.read_text().splitlines()) for path in _modules().values()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def builtin_method_names(registry) -> set[str]:
    """Names of the methods the built-in plugin package registers (aliases such as 'adapter' are
    ordinary words too: the trial's ``adapter/`` folder is not the method)."""
    names = set()
    for name, entry in registry.methods.items():
        module = getattr(registry.pm.get_plugin(entry.plugin), "__name__", "")
        if module.startswith(PLUGIN_PACKAGE):
            names.add(name)
    return names


def test_the_core_names_no_builtin_method_or_plugin_package(registry):
    names = builtin_method_names(registry)
    assert {"lora", "houlsby", "full", "head", "topk", "qlora", "prefix"} <= names  # the check knows what to look for
    found = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in names or node.value.startswith(PLUGIN_PACKAGE):
                    found.append(f"{path.relative_to(CORE.parent)}:{node.lineno} {node.value!r}")
    assert found == []


THIRD_PARTY = '''
import peftbench

class Scale(peftbench.Method):
    """A third-party method that declares what the core asks of a method."""
    name = "scale"
    knob = None
    budgeted = False
    inserts = "nothing (a test plugin)"
    schedule_lr = 0.0123
    in_default_grid = True

    def param_count(self, cfg, spec):
        return 0

    def inject(self, backbone, cfg):
        return peftbench.Injection(backbone, self, cfg)

@peftbench.hookimpl
def register_methods(register):
    register(Scale)
'''


def test_a_method_declares_what_the_core_needs(tmp_path):
    """A plugin joins the default grid with its own tuned learning rate: no core change."""
    from peftbench.running.config import default_methods
    from peftbench.running.plan import declared_lrs, finish_suite
    from peftbench.running.config import SuiteConfig

    (tmp_path / "scale.py").write_text(THIRD_PARTY)
    registry = peftbench.get_registry(plugins_dir=tmp_path)
    assert "scale" in default_methods(registry) and declared_lrs(registry)["scale"] == 0.0123
    suite = finish_suite(SuiteConfig(), registry)
    assert suite.training.lr["scale"] == 0.0123 and "scale" in [m.name for m in suite.methods]


def test_run_flags_are_declared_once():
    from peftbench.running import flags

    parser = argparse.ArgumentParser()
    flags.add_run_arguments(parser)
    text = parser.format_help()
    assert all(f.flag in text for f in flags.FLAGS)
    argv = ["--methods", "lora", "--budget", "2%", "--max-steps", "7", "--lr", "lora=0.1", "--eval-limit", "9",
            "--ray-address", "auto", "--quiet"]
    args = parser.parse_args(argv)
    assert flags.overrides_from_args(args) == {
        "methods": ["lora"], "budgets": ["2%"], "ray": {"address": "auto"},
        "training": {"max_steps": 7, "lr": {"lora": 0.1}, "eval_limit": 9, "test_limit": 9}}
    rebuilt = flags.command_line(args).split()[2:]  # peftbench run ...
    assert parser.parse_args(rebuilt) == args
    targets = [f.target for f in flags.FLAGS if f.target]
    assert len(targets) == len(set(targets))


@pytest.mark.parametrize("field", ["device", "threads", "save_weights", "report_to"])
def test_run_options_never_enter_a_trial(field):
    from peftbench.results.records import TrialSpec, TrainingSpec

    assert field not in TrainingSpec.model_fields and field not in TrialSpec.model_fields


def test_every_core_package_ships_in_the_wheel():
    """pyproject lists packages by hand (the plugins folder installs under another name), so a new
    subpackage left off the list imports from a clone but is missing from an installed wheel."""
    import tomllib

    listed = set(tomllib.loads((CORE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(CORE.parent).parts) for p in CORE.rglob("__init__.py")}
    assert found - listed == set(), f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert PLUGIN_PACKAGE in listed
