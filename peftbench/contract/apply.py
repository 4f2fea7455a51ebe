"""The one way a method is put on a backbone: config checked, injection made, counted.

``apply`` is the template every caller goes through (trials, ``peftbench solve``, loading a
saved adapter, tests that build a model), so a plugin's ``inject`` does only its per-site
work: it never validates or checks its config, ``apply`` has already done both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftbench.errors import VerificationError

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.backbones.backbone import Backbone
    from peftbench.contract.injection import Injection
    from peftbench.contract.method import Method, MethodConfig


def apply(method: "Method", backbone: "Backbone", cfg: "dict[str, Any] | MethodConfig | None" = None, *,
          verify: bool = True) -> "Injection":
    """Inject ``method`` into ``backbone`` and return the injection.

    1. ``method.config(cfg)`` validates the config (ConfigError names the field);
    2. ``method.check(cfg, backbone.spec)`` refuses what cannot be built on this backbone;
    3. the backbone is frozen (its task head stays trainable);
    4. ``method.inject(backbone, cfg)`` does the method's per-site work;
    5. the parameters that now require grad (head excluded) are counted and recorded as
       ``injection.trainable_params``; with ``verify`` they must equal
       ``method.param_count(cfg, backbone.spec)``, else the injection is removed and a
       VerificationError names the method, its knob and both counts.
    """
    cfg = method.config(cfg)
    method.check(cfg, backbone.spec)
    backbone.freeze()
    injection = method.inject(backbone, cfg)
    try:
        measured = backbone.count_trainable()
        if verify:
            expect_count(method, cfg, backbone, measured)
    except BaseException:
        injection.remove()  # nothing is left behind on the backbone
        raise
    injection.trainable_params = measured
    return injection


def measure(method: "Method", backbone: "Backbone", cfg: "dict[str, Any] | MethodConfig | None" = None) -> int:
    """Trainable parameters ``method`` really creates on ``backbone`` (applied, counted, removed)."""
    injection = apply(method, backbone, cfg, verify=False)
    injection.remove()
    return injection.trainable_params


def expect_count(method: "Method", cfg: "MethodConfig", backbone: "Backbone", measured: int) -> None:
    """Raise VerificationError unless ``measured`` is ``method.param_count(cfg, backbone.spec)``."""
    expected = method.param_count(cfg, backbone.spec)
    if measured != expected:
        raise VerificationError(
            f"method {method.name!r} ({method.knob}={method.knob_value(cfg)}): param_count says {expected:,} "
            f"but inject made {measured:,} trainable parameters on {backbone.spec.name} "
            f"(difference {measured - expected:+,})"
        )
