"""The hooks a peftbench plugin may implement (pluggy project name: ``peftbench``).

A plugin is a module (or object) whose functions carry ``@peftbench.hookimpl``. It is found
through the ``peftbench`` entry-point group, or loaded from ``--plugins-dir``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("peftbench")
hookimpl = pluggy.HookimplMarker("peftbench")


@hookspec
def register_methods(register):
    """Register PEFT methods: call ``register(method, aliases=())`` once per method.

    ``method`` is a ``peftbench.Method`` subclass or instance; ``aliases`` are extra names
    users may type (``adapter`` for ``houlsby``).
    """


@hookspec
def register_architectures(register):
    """Register model layouts: call ``register(layout)`` with a ``peftbench.ArchLayout``.

    A layout is keyed by its ``model_type`` (the Hugging Face config's ``model_type``).
    """


@hookspec
def register_tasks(register):
    """Register tasks: call ``register(task)`` with a ``peftbench.Task``-like object."""


@hookspec(firstresult=True)
def resolve_layout(config):
    """Return an ``ArchLayout`` for a model config that no registered layout names, or None.

    The first plugin that answers wins.
    """


@hookspec
def report_sections(context, suite, store):
    """Return sections for a suite's report: markdown, a ``Section``, or a list of them.

    ``context`` is the ``ReportContext`` the built-in sections read: ``suite``, ``info``
    (``suite.json``), ``records`` (typed trial records), ``groups`` (per task, backbone and
    budget, with summaries and ranks), ``fmt`` (the report's formatters: ``fmt.table``,
    ``fmt.fmt_pct`` ...), ``stats``, ``colors`` and ``plot(name)`` (where to save a plot and
    its link). ``suite`` is the suite's name and ``store`` its results store. Declare only
    the arguments you use: ``report_sections(suite, store)`` keeps working.

    Markdown goes at the end of the report. ``context.section(markdown, title=..., after=...)``
    (or ``before=...``) places a section after (or before) a built-in one, named by its key:
    ``setup``, ``results/<task>/<backbone>``, ``results/<task>/<backbone>/<budget or none>``,
    ``pareto/<task>/<backbone>``, ``relative/<task>/<backbone>``, ``failures``, or by its title.
    """
