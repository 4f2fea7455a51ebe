"""The contract every registered method keeps, on every tiny architecture (method x arch), through
the shipped conformance kit (``peftbench.testing``, whose own tests are in test_conformance_kit.py),
plus one forward/backward of each method on the real packaged MiniLM and SmolLM2, and ``apply``'s
template (config checked, frozen, injected, counted, removed on a failed count).
"""

from __future__ import annotations

import re

import pytest
import torch

import peftbench
from conftest import ARCHS, DECODERS, tiny_backbone
from peftbench.testing import check_backbone
from peftbench.testing.checks import NotApplicable

REGISTRY = peftbench.get_registry()
#: (method, architecture) pairs refused on purpose: peft has no LoHa, LoKr, OFT or BOFT layer for GPT-2's Conv1D
REFUSED = {(f"peft:{tuner}", "gpt2") for tuner in ("loha", "lokr", "oft", "boft")}
METHODS = sorted(REGISTRY.methods)


@pytest.fixture(params=METHODS)
def method(request):
    return REGISTRY.method(request.param)


@pytest.mark.parametrize("arch", ARCHS)
def test_conformance(method, arch):
    """The shipped kit's checks (peftbench.testing): count at three knob values, gradients, identity at
    init where declared, remove, save/load, merge where mergeable, monotone count, one training step;
    decoders also as causal LMs (count, gradients, training)."""
    tasks = ["classification", "causal_lm"] if arch in DECODERS else ["classification"]
    for task in tasks:
        try:
            check_backbone(method, tiny_backbone(arch, task=task), None)
        except NotApplicable as exc:  # only the refusals peft itself makes, each with its reason
            assert (method.name, arch) in REFUSED, str(exc)
            assert "Conv1D" in str(exc) and method.name in str(exc)
            return


@pytest.fixture(scope="module")
def real_backbones():
    return {name: peftbench.load_backbone(name, registry=REGISTRY) for name in ("minilm", "smollm2")}


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_packaged_backbone_forward_backward(method, name, real_backbones):
    backbone = real_backbones[name]
    spec = backbone.spec
    cfg = method.config()
    if method.knob is not None:  # the budget's knob at 0.1% (or the nearest feasible size)
        sol = peftbench.solve(method, cfg, spec, "0.1%")
        cfg = method.with_knob(cfg, sol.value)
    injection = peftbench.apply(method, backbone, cfg, verify=False)
    try:
        assert backbone.count_trainable() == method.param_count(cfg, spec)
        tok = backbone.tokenizer
        tok.padding_side = "left" if spec.is_decoder else "right"
        batch = tok(["a fine film", "dull"], return_tensors="pt", padding=True)
        out = backbone.model(**batch, labels=torch.tensor([1, 0]))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        grads = [p.grad for p in injection.named_parameters().values()]
        assert all(g is not None for g in grads) and (not grads or any(g.abs().sum() > 0 for g in grads))
    finally:
        backbone.model.zero_grad(set_to_none=True)
        injection.remove()


# -- apply: the one template every injection goes through ------------------------------------
class _Scale(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(n))


class _Probe(peftbench.Method):
    """A method whose inject does not check; ``param_count`` can be told to be off by ``error``."""

    name = "probe"
    knob = "n"

    class Config(peftbench.MethodConfig):
        n: int = 2

    def __init__(self, refuse: bool = False, error: int = 0):
        self.refuse, self.error, self.injected = refuse, error, 0

    def knob_range(self, cfg, spec):
        return 1, 8

    def check(self, cfg, spec):
        if self.refuse:
            raise peftbench.ConfigError(f"method 'probe': refused on {spec.name}")
        super().check(cfg, spec)

    def param_count(self, cfg, spec):
        return cfg.n + self.error

    def inject(self, backbone, cfg):  # no config(), no check(): apply's job
        self.injected += 1
        injection = peftbench.Injection(backbone, self, cfg)
        injection.attach(backbone.base_model, "probe", _Scale(cfg.n))
        return injection


def _state(backbone):
    return ([(n, type(m).__name__) for n, m in backbone.model.named_modules()],
            {n: p.requires_grad for n, p in backbone.model.named_parameters()},
            {k: v.clone() for k, v in backbone.model.state_dict().items()})


def test_apply_calls_check_even_when_inject_does_not():
    backbone = tiny_backbone("bert")
    flags = {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    probe = _Probe(refuse=True)
    with pytest.raises(peftbench.ConfigError, match="refused on tiny-bert"):
        peftbench.apply(probe, backbone, {"n": 2})
    with pytest.raises(peftbench.ConfigError, match=r"'n' = 9 is out of range on tiny-bert \(allowed 1\.\.8\)"):
        peftbench.apply(_Probe(), backbone, {"n": 9})  # the default check: the knob's range
    with pytest.raises(peftbench.ConfigError, match="method 'probe': field 'm'"):
        peftbench.apply(_Probe(), backbone, {"m": 2})  # the config is validated first
    assert probe.injected == 0, "refused before inject"
    assert {n: p.requires_grad for n, p in backbone.model.named_parameters()} == flags, "and before freezing"
    with pytest.raises(peftbench.ConfigError, match="refused"):
        peftbench.measure(probe, backbone, {"n": 2})  # solve's count goes through apply too


def test_apply_freezes_counts_and_records():
    backbone = tiny_backbone("llama")
    for p in backbone.model.parameters():
        p.requires_grad_(True)  # apply starts from a frozen backbone whatever it was given
    injection = peftbench.apply(_Probe(), backbone, {"n": 3})
    assert injection.trainable_params == backbone.count_trainable() == 3
    assert isinstance(injection.config, _Probe.Config) and injection.config.n == 3
    injection.remove()
    assert peftbench.measure(_Probe(), backbone, _Probe().config(n=5)) == 5
    assert backbone.count_trainable() == 0  # measure removed its injection


@pytest.mark.parametrize("error", [1, -1])
def test_apply_removes_the_injection_when_verification_fails(error):
    backbone = tiny_backbone("gpt2")
    backbone.freeze()
    before = _state(backbone)
    probe = _Probe(error=error)
    message = (f"method 'probe' (n=2): param_count says {2 + error:,} but inject made 2 trainable "
               f"parameters on tiny-gpt2 (difference {-error:+,})")
    with pytest.raises(peftbench.VerificationError, match=re.escape(message)):
        peftbench.apply(probe, backbone, {"n": 2})
    assert probe.injected == 1, "inject ran; its result was removed"
    after = _state(backbone)
    assert after[0] == before[0] and after[1] == before[1]
    assert after[2].keys() == before[2].keys() and all(torch.equal(after[2][k], v) for k, v in before[2].items())
    assert not hasattr(backbone.base_model, "peftbench_probe")
    injection = peftbench.apply(probe, backbone, {"n": 2}, verify=False)  # measuring only: kept, counted
    assert injection.trainable_params == 2
    injection.remove()
    assert peftbench.measure(probe, backbone, {"n": 2}) == 2


def test_load_injection_goes_through_apply(tmp_path):
    backbone = tiny_backbone("bert")
    peftbench.apply(_Probe(), backbone, {"n": 4}).save(tmp_path)

    class Registry:  # anything with .method(name)
        def __init__(self, method):
            self.m = method

        def method(self, name):
            assert name == "probe"
            return self.m

    fresh = tiny_backbone("bert")
    loaded = peftbench.load_injection(fresh, tmp_path, Registry(_Probe()))
    assert loaded.trainable_params == fresh.count_trainable() == 4
    loaded.remove()
    with pytest.raises(peftbench.VerificationError, match="param_count says 5"):
        peftbench.load_injection(fresh, tmp_path, Registry(_Probe(error=1)))
    with pytest.raises(peftbench.ConfigError, match="refused"):
        peftbench.load_injection(fresh, tmp_path, Registry(_Probe(refuse=True)))
    assert fresh.count_trainable() == 0 and not hasattr(fresh.base_model, "peftbench_probe")


# -- what the core asks of a method: declared by each built-in plugin -------------------------
SCHEDULE_LR = {"full": 2e-4, "head": 3e-2, "lora": 5e-3, "qlora": 5e-3, "adapter_lora": 5e-3, "houlsby": 3e-3,
               "pfeiffer": 1e-2, "ptuning_v2": 1e-1}
REFERENCE = {"full": "ceiling", "head": "floor"}


def test_builtin_methods_declare_what_the_core_asks():
    builtin = {n: e.obj for n, e in REGISTRY.methods.items() if e.obj.__module__.startswith("peftbench_plugins")}
    assert set(builtin) >= {"full", "head", "topk", "lora", "qlora", "adapter_lora", "houlsby", "pfeiffer",
                            "prefix", "ptuning_v2", "prompt", "ptuning"}
    for name, method in builtin.items():
        assert method.schedule_lr == SCHEDULE_LR.get(name), name
        assert method.in_default_grid is (name != "topk" and not name.startswith("peft:")), name
        assert method.reference == REFERENCE.get(name), name
        assert (method.reference is None) is method.budgeted, "a reference baseline is not budget-solved"
        described = method.describe()
        assert (described["schedule_lr"], described["in_default_grid"], described["reference"]) == (
            method.schedule_lr, method.in_default_grid, method.reference)
    assert peftbench.Method.schedule_lr is None and peftbench.Method.in_default_grid is True
    assert peftbench.Method.reference is None


def test_injection_costs_default_to_none():
    backbone = tiny_backbone("bert")
    injection = peftbench.apply(REGISTRY.method("lora"), backbone, {"r": 2})
    assert injection.costs() == {}
    injection.remove()
    assert peftbench.Cost(value=3, unit="bytes").value == 3.0
    with pytest.raises(ValueError):
        peftbench.Cost(value=1, unit="furlongs")
