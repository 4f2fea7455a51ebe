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
def report_sections(suite, store):
    """Return markdown (a string, or a list of strings) to append to a suite's report."""
