"""Sections from plugins: every ``report_sections`` hook implementation, in pluggy's call order.

The hook is ``report_sections(context, suite, store)``; pluggy passes an implementation only
the arguments it declares, and so does this module, so a plugin written for the older
``report_sections(suite, store)`` keeps working. An answer is markdown, a ``Section`` or a
list of them; a Section may say where it goes (``after=`` / ``before=`` a built-in section).
Anything a plugin gets wrong is a ``PluginError`` that names the plugin.
"""

from __future__ import annotations

from peftbench.errors import PluginError
from peftbench.report.context import PlacementError, ReportContext, Section, as_sections, place
from peftbench.results.store import Store


def plugin_sections(registry, context: ReportContext, store: Store) -> list[Section]:
    """The sections every plugin returns, in pluggy's call order (not yet placed)."""
    return [section for _, sections in _answers(registry, context, store) for section in sections]


def place_plugin_sections(sections: list[Section], registry, context: ReportContext, store: Store) -> None:
    """Place every plugin's sections among ``sections`` (the built-in ones), where each asks to go."""
    for plugin, answer in _answers(registry, context, store):
        for section in answer:
            try:
                place(sections, section)
            except PlacementError as exc:
                raise PluginError(f"plugin {plugin!r} placed a report section badly: {exc}") from None


def _answers(registry, context: ReportContext, store: Store) -> list[tuple[str, list[Section]]]:
    """(plugin name, its sections) for each implementation of the hook."""
    offered = {"context": context, "suite": context.suite, "store": store}
    out = []
    # get_hookimpls() lists in registration order; pluggy calls them last-registered first
    for impl in reversed(registry.pm.hook.report_sections.get_hookimpls()):
        try:
            answer = impl.function(**{name: offered[name] for name in impl.argnames})
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} raised in report_sections: "
                              f"{type(exc).__name__}: {exc}") from exc
        try:
            out.append((impl.plugin_name, as_sections(answer)))
        except TypeError as exc:
            raise PluginError(f"plugin {impl.plugin_name!r} returned from report_sections: {exc}") from None
    return out
