"""From a spec string to a ``Task``: ``file:``, ``hub:``, the GLUE table, or a registered name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftbench.errors import ConfigError, unknown
from peftbench.tasks import sources
from peftbench.tasks.task import Task

if TYPE_CHECKING:  # pragma: no cover
    import datasets


def get_task(spec: str, registry, **options) -> Task:
    """The Task ``spec`` names; ``options`` (columns, kind ...) apply to ``file:``/``hub:`` tasks.

    ``registry`` is the plugin registry whose ``tasks`` hold the registered names.
    """
    spec = spec.strip()
    options = {k: v for k, v in options.items() if v is not None}
    if spec.startswith("file:"):
        return sources.file_task(spec[len("file:"):], **options)
    if spec.startswith("hub:"):
        return sources.hub_task(spec[len("hub:"):], **options)
    if options:
        raise ConfigError(f"task {spec!r}: options {sorted(options)} apply only to file: and hub: tasks")
    if spec in sources.BENCHMARKS:
        return sources.benchmark_task(spec)
    registered = registry.tasks
    if spec in registered:
        return registered[spec].obj
    sources.refuse_unsupported(spec)
    raise ConfigError(unknown("task", spec, [*registered, *sources.BENCHMARKS])
                      + "; or use file:PATH or hub:NAME with --text-column/--label-column")


def packaged_data(name: str) -> "datasets.DatasetDict":
    """A task file shipped in ``peftbench/data`` (see PROVENANCE.md there), as raw splits."""
    return sources.read_packaged(name)
