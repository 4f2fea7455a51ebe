"""Find plugins (entry points, ``--plugins-dir``), collect what they register, name culprits.

One pluggy project name, ``peftbench``, is used for markers, the manager and the
entry-point group, so built-in and third-party plugins are found the same way.
Set ``PEFTBENCH_DISABLE_PLUGINS=a,b`` to block plugins by name.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from peftbench.contract import hookspecs
from peftbench.errors import ConfigError, PluginError, unknown

PROJECT = "peftbench"
DISABLE_ENV = "PEFTBENCH_DISABLE_PLUGINS"


@dataclass
class Entry:
    """One registered thing and the plugin that registered it."""

    name: str
    obj: Any
    plugin: str
    aliases: tuple[str, ...] = ()


@dataclass
class Registry:
    """Everything the loaded plugins registered, by kind."""

    pm: pluggy.PluginManager
    methods: dict[str, Entry] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    architectures: dict[str, Entry] = field(default_factory=dict)
    tasks: dict[str, Entry] = field(default_factory=dict)

    # -- lookups -------------------------------------------------------------------------
    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        if key in self.methods:
            return key
        if key in self.aliases:
            return self.aliases[key]
        raise ConfigError(unknown("method", name, [*self.methods, *self.aliases]))

    def method(self, name: str):
        return self.methods[self.canonical(name)].obj

    def task(self, name: str):
        if name not in self.tasks:
            raise ConfigError(unknown("task", name, self.tasks))
        return self.tasks[name].obj

    def layout_for(self, config):
        """The ArchLayout for a HF config: registered table first, then ``resolve_layout``."""
        from peftbench.errors import LayoutError

        model_type = getattr(config, "model_type", None)
        if model_type in self.architectures:
            return self.architectures[model_type].obj
        answer = self.pm.hook.resolve_layout(config=config)
        if answer is not None:
            return answer
        raise LayoutError(
            f"no layout for model_type {model_type!r}; registered: "
            f"{', '.join(sorted(self.architectures)) or '(none)'}. Register one from a plugin:\n"
            "    @peftbench.hookimpl\n"
            "    def register_architectures(register):\n"
            f"        register(peftbench.ArchLayout(model_type={model_type!r}, layers='...', sites={{...}}))\n"
            "or answer the resolve_layout(config) hook."
        )

    def plugin_names(self) -> list[str]:
        return sorted(name for name, plugin in self.pm.list_name_plugin() if name and plugin is not None)

    def blocked_names(self) -> list[str]:
        return sorted(name for name, plugin in self.pm.list_name_plugin() if name and plugin is None)


def _plugin_name(pm: pluggy.PluginManager, plugin) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def _blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


_WARNED: set[frozenset] = set()


def warn_unknown_blocked(known: set[str]) -> str | None:
    """One stderr line (once per process and set) for names in the block list that no plugin has."""
    unknown_names = _blocked() - known
    if not unknown_names or frozenset(unknown_names) in _WARNED:
        return None
    _WARNED.add(frozenset(unknown_names))
    line = (f"peftbench: warning: {DISABLE_ENV} names no plugin called {', '.join(sorted(unknown_names))}; "
            f"plugins known here: {', '.join(sorted(known)) or '(none)'}")
    print(line, file=sys.stderr)
    return line


def _entry_point_names() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group=PROJECT)}


def _load_dir(pm: pluggy.PluginManager, directory: str | Path) -> None:
    directory = Path(directory)
    if not directory.is_dir():
        raise PluginError(f"--plugins-dir {str(directory)!r} is not a directory")
    for path in sorted(directory.glob("*.py")):
        name = path.stem
        if name in _blocked() or pm.is_blocked(name):
            continue
        spec = importlib.util.spec_from_file_location(f"peftbench_dir_plugin_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import would: dataclasses and pickling look the module up there
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a plugin's own bug: name it, don't crash deep inside
            sys.modules.pop(spec.name, None)
            raise PluginError(f"plugin {name!r} ({path}) failed to import: {type(exc).__name__}: {exc}") from exc
        pm.register(module, name=name)


def make_manager(plugins_dir: str | Path | None = None, extra: list | None = None) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in _blocked():
        pm.set_blocked(name)
    try:
        pm.load_setuptools_entrypoints(PROJECT)
    except Exception as exc:
        raise PluginError(f"a plugin of the {PROJECT!r} entry-point group failed to load: {type(exc).__name__}: {exc}") from exc
    if plugins_dir:
        _load_dir(pm, plugins_dir)
    for plugin in extra or []:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
    pm.check_pending()
    extras = {getattr(p, "__name__", None) or type(p).__name__ for p in extra or []}
    stems = {p.stem for p in Path(plugins_dir).glob("*.py")} if plugins_dir else set()
    warn_unknown_blocked(_entry_point_names() | stems | extras)
    return pm


def _collect(pm: pluggy.PluginManager, hook_name: str, make_register):
    """Call one registration hook plugin by plugin, so every entry knows its plugin."""
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin_name = impl.plugin_name or _plugin_name(pm, impl.plugin)
        try:
            impl.function(register=make_register(plugin_name))
        except (PluginError, ConfigError):
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin_name!r} raised during {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc


def build_registry(pm: pluggy.PluginManager) -> Registry:
    reg = Registry(pm=pm)

    def method_register(plugin):
        def register(method, aliases=()):
            from peftbench.contract.method import Method

            obj = method() if inspect.isclass(method) else method
            if not isinstance(obj, Method):
                raise PluginError(f"plugin {plugin!r} registered {method!r}, which is not a peftbench.Method")
            name = obj.name.lower()
            names = (name, *[a.lower() for a in (*obj.aliases, *aliases)])
            for n in names:
                holder = reg.methods.get(n) or (reg.methods.get(reg.aliases[n]) if n in reg.aliases else None)
                if holder is not None:
                    raise PluginError(
                        f"method name {n!r} is registered twice: by plugin {holder.plugin!r} "
                        f"(method {holder.name!r}) and by plugin {plugin!r} (method {name!r})"
                    )
            reg.methods[name] = Entry(name, obj, plugin, tuple(names[1:]))
            for alias in names[1:]:
                reg.aliases[alias] = name

        return register

    def arch_register(plugin):
        def register(layout):
            key = layout.model_type
            if key in reg.architectures:
                raise PluginError(
                    f"architecture {key!r} is registered twice: by plugin "
                    f"{reg.architectures[key].plugin!r} and by plugin {plugin!r}"
                )
            reg.architectures[key] = Entry(key, layout, plugin)

        return register

    def task_register(plugin):
        def register(task):
            key = task.name
            if key in reg.tasks:
                raise PluginError(
                    f"task {key!r} is registered twice: by plugin {reg.tasks[key].plugin!r} and by plugin {plugin!r}"
                )
            reg.tasks[key] = Entry(key, task, plugin)

        return register

    _collect(pm, "register_methods", method_register)
    _collect(pm, "register_architectures", arch_register)
    _collect(pm, "register_tasks", task_register)
    return reg


_DEFAULT: Registry | None = None


def get_registry(plugins_dir: str | Path | None = None, extra: list | None = None, fresh: bool = False) -> Registry:
    """The registry of all installed plugins (cached unless ``fresh`` or custom arguments)."""
    global _DEFAULT
    if plugins_dir or extra or fresh:
        reg = build_registry(make_manager(plugins_dir, extra))
        if not (plugins_dir or extra):
            _DEFAULT = reg
        return reg
    if _DEFAULT is None:
        _DEFAULT = build_registry(make_manager())
    return _DEFAULT

