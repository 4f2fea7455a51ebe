"""Errors peftbench raises for bad input: each names the culprit and what is allowed."""

from __future__ import annotations

import difflib


class PeftbenchError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(PeftbenchError, ValueError):
    """A configuration value is wrong (names the field path and what is allowed)."""


class PluginError(PeftbenchError):
    """A plugin failed to load or register, or two plugins claim one name."""


class BudgetError(PeftbenchError, ValueError):
    """A budget is malformed or cannot be reached by a method."""


class LayoutError(PeftbenchError):
    """A model has no layout, or a layout path matches nothing."""


class AssetError(PeftbenchError):
    """A packaged model or dataset is missing (says which install fixes it)."""


class VerificationError(PeftbenchError):
    """A method's param_count disagrees with what its inject created."""


def did_you_mean(name: str, known: list[str] | tuple[str, ...] | set[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, name: str, known) -> str:
    known = sorted(known)
    return f"unknown {kind} {name!r}{did_you_mean(name, known)}; known: {', '.join(known) or '(none)'}"
