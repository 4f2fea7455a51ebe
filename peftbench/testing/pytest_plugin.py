"""The peftbench pytest plugin (entry point ``pytest11: peftbench``, loaded by pytest whenever
peftbench is installed; from a checkout that is not installed: ``-p peftbench.testing.pytest_plugin``).

- ``--peftbench-real NAME`` (repeatable): ``MethodConformance.test_real`` also runs on that real
  backbone (``minilm``, ``smollm2``, a folder or a hub id);
- fixture ``peftbench_registry``: every installed plugin's registry (one per session);
- fixture ``peftbench_tiny``: ``peftbench_tiny(model_type, task="classification")`` builds a tiny
  random backbone of a registered architecture (``peftbench.testing.tiny_backbone``).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("peftbench", "peftbench method conformance")
    group.addoption("--peftbench-real", action="append", default=[], metavar="NAME",
                    help="also run MethodConformance's real-backbone checks on backbone NAME (repeatable)")


@pytest.fixture(scope="session")
def peftbench_registry():
    import peftbench

    return peftbench.get_registry()


@pytest.fixture
def peftbench_tiny(peftbench_registry):
    from peftbench.testing.tiny import tiny_backbone

    def make(model_type: str, task: str = "classification", **overrides):
        return tiny_backbone(model_type, task, registry=peftbench_registry, **overrides)

    return make
