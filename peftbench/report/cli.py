"""``peftbench report <suite>``: (re)write ``<out>/<suite>/report.md`` from the stored results."""

from __future__ import annotations

from pathlib import Path

from peftbench.errors import ConfigError, did_you_mean
from peftbench.report.render import write_report
from peftbench.results.store import Store, suite_dirs


def add_report_arguments(parser) -> None:
    parser.add_argument("suite", help="suite name: the folder <out>/<suite> holding results.sqlite")
    parser.add_argument("--out", default="reports", metavar="DIR", help="folder holding the suites (default: reports)")


def main_report(args, registry=None) -> int:
    """The command. ``registry``: the caller's; without one, the installed plugins (and ``--plugins-dir``)."""
    out = Path(args.out)
    suite_dir = out / args.suite
    store_path = suite_dir / "results.sqlite"
    if not store_path.is_file():
        known = suite_dirs(out)
        where = f"{out}/" if out.is_dir() else f"{out}/ (which does not exist)"
        listing = f"suites there: {', '.join(known)}" if known else "no suites there yet (run `peftbench run` first)"
        raise ConfigError(f"no suite {args.suite!r} in {where}: {store_path} not found"
                          f"{did_you_mean(args.suite, known)}; {listing}")
    if registry is None:  # the command line is the one place that builds the registry
        from peftbench.contract.registry import get_registry

        registry = get_registry(plugins_dir=getattr(args, "plugins_dir", None))
    with Store(store_path, create=False, registry=registry) as store:  # registry: to migrate an older store
        path = write_report(suite_dir, store, registry)
    print(f"wrote {path}")
    return 0
