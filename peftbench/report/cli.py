"""``peftbench report <suite>``: (re)write ``<out>/<suite>/report.md`` from the stored results.

``<suite>`` is a suite name under ``--out`` or the path of a suite folder; the report goes to
``<out>/<name>``, so a read-only suite folder (an archive, a colleague's share) renders to
another ``--out`` without a byte written where it lies.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftbench.errors import ConfigError, did_you_mean
from peftbench.report.render import write_report
from peftbench.results.store import Store, suite_dirs
from peftbench.running.suite_dir import STORE_FILE, unwritable


def add_report_arguments(parser) -> None:
    parser.add_argument("suite", help="suite name (the folder <out>/<suite> holding results.sqlite), or the path "
                                      "of a suite folder: its report then goes to <out>/<folder name>")
    parser.add_argument("--out", default="reports", metavar="DIR",
                        help="folder holding the suites, where the report is written (default: reports)")
    parser.add_argument("--int8", action="store_true",
                        help="also quantise every finished trial's saved method weights to int8 (torch dynamic "
                             "quantisation) and add INT8 columns per budget: stored size, validation metric change, "
                             "inference time ratio (computed once per trial, cached in its folder as int8.json)")


def _source(args, out: Path) -> Path:
    """The suite folder to read: a path to a folder holding a store, else ``out/<suite>``."""
    given = Path(args.suite).expanduser()
    if (os.sep in args.suite or args.suite in (".", "..")) and (given / STORE_FILE).is_file():
        return given
    suite_dir = out / args.suite
    store_path = suite_dir / STORE_FILE
    if not store_path.is_file():
        known = suite_dirs(out) if out.is_dir() else []
        where = f"{out}/" if out.is_dir() else f"{out}/ (which does not exist)"
        listing = f"suites there: {', '.join(known)}" if known else "no suites there yet (run `peftbench run` first)"
        raise ConfigError(f"no suite {args.suite!r} in {where}: {store_path} not found"
                          f"{did_you_mean(args.suite, known)}; {listing}")
    return suite_dir


def _check_target(target: Path, source: Path) -> None:
    blocked = unwritable(target)
    if blocked and blocked[0] == "file":
        raise ConfigError(f"{blocked[1]} is a file, not a folder; give --out a folder")
    if blocked:
        existing = blocked[1]
        hint = (f"render it elsewhere with: peftbench report {source} --out DIR" if target.resolve() == source.resolve()
                else "give --out a writable folder")
        raise ConfigError(f"{existing} is read-only, so {target / 'report.md'} cannot be written; {hint}")


def main_report(args, registry=None) -> int:
    """The command. ``registry``: the caller's; without one, the installed plugins (and ``--plugins-dir``)."""
    out = Path(args.out)
    source = _source(args, out)
    target = out / source.resolve().name
    _check_target(target, source)
    if registry is None:  # the command line is the one place that builds the registry
        from peftbench.contract.registry import get_registry

        registry = get_registry(plugins_dir=getattr(args, "plugins_dir", None))
    # a suite this process cannot write is read as it lies (never written, nor migrated)
    readonly = not all(os.access(p, os.W_OK) for p in (source, source / STORE_FILE))
    with Store(source / STORE_FILE, create=False, registry=registry, readonly=readonly) as store:
        path = write_report(source, store, registry, target, int8=getattr(args, "int8", False))
    print(f"wrote {path}")
    return 0
