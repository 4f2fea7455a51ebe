"""Conformance kit for peftbench methods, built-in or third-party.

Hold a method to the contract in a test module::

    from peftbench.testing import MethodConformance

    class TestMyMethod(MethodConformance):
        method = MyMethod()

or call ``check_method(method)`` (every check on every registered architecture's tiny random
backbone; ``real=["minilm"]`` adds a real one), or one check: ``check_remove(method, backbone, cfg)``.
A failure is a ``ConformanceError`` naming the method, the backbone, the knob, the check and the cause.
The checks are described in ``peftbench.testing.checks``; the pytest plugin (options, fixtures) in
``peftbench.testing.pytest_plugin``.
"""

from peftbench.testing.checks import (
    CHECKS,
    ConformanceError,
    NotApplicable,
    check_count,
    check_gradients,
    check_identity,
    check_merge,
    check_monotone,
    check_remove,
    check_save_load,
    check_train,
    perturb,
    run_check,
    structure,
)
from peftbench.testing.conformance import (
    CAUSAL_LM_CHECKS,
    MethodConformance,
    architectures,
    check_backbone,
    check_method,
    configured,
    knob_values,
)
from peftbench.testing.tiny import labels_for, real_batch, tiny_backbone, tiny_batch, tiny_config

__all__ = [
    "CAUSAL_LM_CHECKS", "CHECKS", "ConformanceError", "MethodConformance", "NotApplicable", "architectures", "check_backbone",
    "check_count", "check_gradients", "check_identity", "check_merge", "check_method", "check_monotone",
    "check_remove", "check_save_load", "check_train", "configured", "knob_values", "labels_for", "perturb",
    "real_batch", "run_check", "structure", "tiny_backbone", "tiny_batch", "tiny_config",
]
