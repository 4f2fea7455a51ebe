"""Run the conformance checks over a method: every registered architecture's tiny backbone
(classification; decoders also as causal LMs), several knob values for the count, and
optionally a real backbone. ``MethodConformance`` turns that into pytest tests."""

from __future__ import annotations

from peftbench.errors import ConfigError, LayoutError
from peftbench.testing.checks import CHECKS, ConformanceError, NotApplicable, run_check
from peftbench.testing.tiny import tiny_backbone

#: the checks run on a causal-LM head too (decoders): counts, gradients and a training step
CAUSAL_LM_CHECKS = ("count", "gradients", "train")


def knob_values(method, spec, cfg=None) -> list[int | None]:
    """Knob values the count is checked at: the smallest, the next and one three steps up (in range)."""
    if method.knob is None:
        return [None]
    lo, hi = method.knob_range(method.config(cfg), spec)
    return sorted({lo, min(lo + 1, hi), min(lo + 3, hi)})


def configured(method, spec, cfg=None, value: int | None = None):
    """``cfg`` (default: the method's defaults) with the knob at ``value`` (default: the second of
    ``knob_values``: small, so tiny backbones stay fast)."""
    cfg = method.config(cfg)
    if method.knob is None:
        return cfg
    if value is None:
        values = knob_values(method, spec, cfg)
        value = values[min(1, len(values) - 1)]
    return method.with_knob(cfg, value)


def architectures(registry=None) -> list[str]:
    """The model types of every registered architecture."""
    import peftbench

    return sorted((registry if registry is not None else peftbench.get_registry()).architectures)


def _refused_at_injection(method, backbone, cfg) -> None:
    """NotApplicable when injecting raises a ConfigError (a module type the method has no layer for,
    such as GPT-2's Conv1D for some of peft's tuners): a clear refusal, not a bug. Anything else is
    left to the checks, which name it."""
    from peftbench.contract.apply import apply

    try:
        injection = apply(method, backbone, cfg)
    except (ConfigError, LayoutError) as exc:
        raise NotApplicable(f"method {method.name!r} refuses {backbone.spec.name} ({backbone.task}) when "
                            f"injected: {exc}") from exc
    except Exception:  # noqa: BLE001  (the checks report it with their name)
        return
    injection.remove()


def check_backbone(method, backbone, cfg=None, checks=None) -> None:
    """Run ``checks`` (default: every one of ``CHECKS``; only ``CAUSAL_LM_CHECKS`` on a causal LM)
    of ``method`` at ``cfg`` on ``backbone``; ``count`` at each of ``knob_values``. NotApplicable when
    the method refuses the backbone with a ConfigError (a site it needs is missing ...), in ``check`` or
    when injected."""
    try:
        method.check(configured(method, backbone.spec, cfg), backbone.spec)
    except (ConfigError, LayoutError) as exc:
        raise NotApplicable(f"method {method.name!r} refuses {backbone.spec.name} ({backbone.task}): {exc}") from exc
    _refused_at_injection(method, backbone, configured(method, backbone.spec, cfg))
    default = CAUSAL_LM_CHECKS if backbone.task == "causal_lm" else tuple(CHECKS)
    for name in checks or default:
        if name == "count":
            for value in knob_values(method, backbone.spec, cfg):
                run_check(name, method, backbone, configured(method, backbone.spec, cfg, value))
        else:
            run_check(name, method, backbone, configured(method, backbone.spec, cfg))


def check_method(method, *, registry=None, archs=None, cfg=None, checks=None, real=None) -> list[str]:
    """Every check of ``method`` on the tiny backbone of each of ``archs`` (default: every registered
    architecture), decoders also as causal LMs, and on the real backbones named in ``real`` (e.g.
    ``["minilm"]``, loaded with ``peftbench.load_backbone``). Raises ``ConformanceError`` listing every
    failure, or when the method refuses every backbone; returns what passed, as ``"<backbone>/<task>"``
    (backbones the method refuses with a ConfigError are left out)."""
    import peftbench

    registry = registry if registry is not None else peftbench.get_registry()
    done, failures, refused = [], [], []
    cases = [(arch, "classification") for arch in (archs or architectures(registry))]
    cases += [(arch, "causal_lm") for arch, _ in list(cases) if registry.architectures[arch].obj.causal]
    backbones = [(lambda a=arch, t=task: tiny_backbone(a, t, registry=registry)) for arch, task in cases]
    backbones += [(lambda n=name: peftbench.load_backbone(n, registry=registry)) for name in real or []]
    for make in backbones:
        backbone = make()
        try:
            check_backbone(method, backbone, cfg, checks)
            done.append(f"{backbone.spec.name}/{backbone.task}")
        except ConformanceError as exc:
            failures.append(str(exc))
        except NotApplicable as exc:
            refused.append(str(exc))
    if failures:
        raise ConformanceError("\n".join(failures))
    if not done:
        raise ConformanceError("\n".join(["the method refuses every backbone it was given:", *refused]))
    return done


class MethodConformance:
    """Subclass in a test module to hold a method to the whole contract::

        from peftbench.testing import MethodConformance

        class TestMyMethod(MethodConformance):
            method = MyMethod()          # an instance, a Method class, or a registered name
            config = {"alpha": 2.0}      # optional: the config the checks use (knob set by the kit)

    pytest then collects one test per check and architecture (``test_check[<check>-<arch>]``; decoders
    also as ``causal_lm``), and ``test_real`` on each backbone given by ``--peftbench-real`` (for example
    ``--peftbench-real minilm``; without the peftbench pytest plugin: the ``real_backbones`` attribute).
    ``architectures`` (default: every registered one) and ``checks`` narrow the matrix."""

    method = None
    config: dict | None = None
    architectures: tuple[str, ...] | None = None
    checks: tuple[str, ...] | None = None
    real_backbones: tuple[str, ...] = ()
    registry = None

    def _method(self):
        import inspect

        import peftbench

        if isinstance(self.method, str):
            return (self.registry or peftbench.get_registry()).method(self.method)
        return self.method() if inspect.isclass(self.method) else self.method

    def pytest_generate_tests(self, metafunc):
        if "peftbench_case" in metafunc.fixturenames:
            registry = self.registry
            archs = self.architectures or architectures(registry)
            import peftbench

            reg = registry if registry is not None else peftbench.get_registry()
            cases = [(c, a, "classification") for a in archs for c in (self.checks or CHECKS)]
            cases += [(c, a, "causal_lm") for a in archs if reg.architectures[a].obj.causal
                      for c in (self.checks or CAUSAL_LM_CHECKS) if c in CAUSAL_LM_CHECKS]
            ids = [f"{c}-{a}" + ("-causal_lm" if t == "causal_lm" else "") for c, a, t in cases]
            metafunc.parametrize("peftbench_case", cases, ids=ids)
        if "peftbench_real" in metafunc.fixturenames:
            option = getattr(metafunc.config.option, "peftbench_real", None) or []
            names = list(dict.fromkeys([*self.real_backbones, *option]))
            metafunc.parametrize("peftbench_real", names or [None], ids=names or ["none"])

    def test_check(self, peftbench_case):
        import pytest

        check, arch, task = peftbench_case
        backbone = tiny_backbone(arch, task, registry=self.registry)
        try:
            check_backbone(self._method(), backbone, self.config, [check])
        except NotApplicable as exc:
            pytest.skip(str(exc))

    def test_real(self, peftbench_real):
        import pytest

        import peftbench

        if peftbench_real is None:
            pytest.skip("no real backbone named (--peftbench-real NAME or the real_backbones attribute)")
        backbone = peftbench.load_backbone(peftbench_real, registry=self.registry or peftbench.get_registry())
        try:
            check_backbone(self._method(), backbone, self.config, ["count", "gradients", "remove", "train"])
        except NotApplicable as exc:
            pytest.skip(str(exc))
