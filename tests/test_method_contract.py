"""The contract every registered method keeps, on every tiny architecture (method x arch).

1. param_count == parameters requiring grad after inject (head excluded), several knobs;
2. only the method's parameters and the head get gradients; frozen weights are
   bit-identical after an optimiser step;
3. remove() restores the model bit for bit (state, flags, module types, outputs);
4. save + load onto a fresh backbone reproduces the trained model's outputs exactly and
   the file holds only the method's weights and the head;
5. a few optimiser steps reduce the loss.
Plus one forward/backward of each method on the real packaged MiniLM and SmolLM2.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import peftbench
from conftest import ARCHS, batch_for, tiny_backbone

REGISTRY = peftbench.get_registry()
METHODS = sorted(REGISTRY.methods)


def knob_values(method, spec) -> list[int | None]:
    if method.knob is None:
        return [None]
    lo, hi = method.knob_range(method.config(), spec)
    return sorted({lo, min(lo + 1, hi), min(lo + 3, hi)})


def configured(method, spec, value=None):
    cfg = method.config()
    if method.knob is None:
        return cfg
    values = knob_values(method, spec)
    return method.with_knob(cfg, value if value is not None else values[min(1, len(values) - 1)])


def loss_of(backbone, batch, labels):
    out = backbone.model(**batch, labels=labels)
    return out.loss


def labels_for(backbone, batch):
    if backbone.task == "causal_lm":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return labels
    return torch.tensor([0, 1, 1][: batch["input_ids"].shape[0]])


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(injection, seed=3, added_only=False):
    """Give method parameters non-initial values (so identity inits can't hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    params = injection.added_parameters() if added_only else injection.named_parameters()
    with torch.no_grad():
        for p in params.values():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


@pytest.fixture(params=METHODS)
def method(request):
    return REGISTRY.method(request.param)


@pytest.mark.parametrize("arch", ARCHS)
def test_param_count_matches_instantiation(method, arch):
    backbone = tiny_backbone(arch)
    for value in knob_values(method, backbone.spec):
        cfg = method.config() if value is None else method.with_knob(method.config(), value)
        injection = peftbench.apply(method, backbone, cfg, verify=False)  # compared here, not by apply
        measured = backbone.count_trainable()
        own = sum(peftbench.logical_numel(p) for p in injection.named_parameters().values() if p.requires_grad)
        injection.remove()
        assert measured == method.param_count(cfg, backbone.spec), (method.name, arch, value)
        assert injection.trainable_params == measured, "apply records what it counted"
        assert own == measured, "the injection must account for every parameter it trains"


@pytest.mark.parametrize("arch", ARCHS)
def test_only_method_params_train(method, arch):
    backbone = tiny_backbone(arch)
    cfg = configured(method, backbone.spec)
    injection = peftbench.apply(method, backbone, cfg)
    perturb(injection)
    backbone.model.train()
    own = {id(p) for p in injection.named_parameters().values()}
    head = {id(p) for p in backbone.head_parameters().values()}
    trainable = [p for p in backbone.model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == own | head
    frozen = {n: t.detach().clone() for n, t in backbone.model.state_dict(keep_vars=True).items()
              if not (isinstance(t, torch.nn.Parameter) and id(t) in own | head)}
    optim = torch.optim.AdamW(trainable, lr=1e-2) if trainable else None
    batch = batch_for(backbone)
    loss = loss_of(backbone, batch, labels_for(backbone, batch))
    loss.backward()
    for n, p in backbone.model.named_parameters():
        if id(p) not in own | head:
            assert p.grad is None, f"frozen {n} got a gradient"
    if own:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in injection.named_parameters().values())
    if optim:
        optim.step()
    after = backbone.model.state_dict()
    for n, t in frozen.items():
        assert torch.equal(after[n], t), f"frozen {n} changed"


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_restores_bit_for_bit(method, arch):
    backbone = tiny_backbone(arch)
    backbone.freeze()
    batch = batch_for(backbone)
    before_state = snapshot(backbone.model)
    before_flags = {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    before_types = [(n, type(m).__name__) for n, m in backbone.model.named_modules()]
    before_impl = backbone.model.config._attn_implementation
    with torch.no_grad():
        before_out = backbone.model(**batch).logits
    injection = peftbench.apply(method, backbone, configured(method, backbone.spec))
    perturb(injection, added_only=True)  # trained base weights are the method's to change
    with torch.no_grad():
        backbone.model(**batch)
    injection.remove()
    assert [(n, type(m).__name__) for n, m in backbone.model.named_modules()] == before_types
    assert {n: p.requires_grad for n, p in backbone.model.named_parameters()} == before_flags
    assert backbone.model.config._attn_implementation == before_impl
    after_state = backbone.model.state_dict()
    assert after_state.keys() == before_state.keys()
    for n, t in before_state.items():
        assert torch.equal(after_state[n], t), n
    with torch.no_grad():
        assert torch.equal(backbone.model(**batch).logits, before_out)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_reproduces_outputs(method, arch, tmp_path):
    backbone = tiny_backbone(arch, seed=0)
    cfg = configured(method, backbone.spec)
    injection = peftbench.apply(method, backbone, cfg)
    perturb(injection)
    with torch.no_grad():
        for p in backbone.head_parameters().values():
            p.add_(0.1)
    injection.finalize()
    batch = batch_for(backbone)
    with torch.no_grad():
        expected = backbone.model(**batch).logits
    injection.save(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    head_keys = {f"head.{n}" for n in backbone.head_parameters()}
    assert set(saved) == set(injection.state_dict()) | head_keys
    fresh = tiny_backbone(arch, seed=123)  # different random head and base? base must match:
    fresh.model.load_state_dict(tiny_backbone(arch, seed=0).model.state_dict())
    with torch.no_grad():
        for p in fresh.head_parameters().values():
            p.zero_()
    fresh.freeze()
    peftbench.load_injection(fresh, tmp_path, REGISTRY)
    with torch.no_grad():
        got = fresh.model(**batch).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_loss(method, arch):
    torch.manual_seed(0)
    backbone = tiny_backbone(arch)
    injection = peftbench.apply(method, backbone, configured(method, backbone.spec))
    backbone.model.train()
    for module in backbone.model.modules():  # dropout off: a deterministic comparison
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    batch = batch_for(backbone, batch=3)
    labels = labels_for(backbone, batch)
    losses = []
    for _ in range(8):
        optim.zero_grad()
        loss = loss_of(backbone, batch, labels)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (method.name, arch, losses)
    injection.remove()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_contract(method, arch):
    """Decoders with an LM head: counts hold and training reduces the LM loss."""
    backbone = tiny_backbone(arch, task="causal_lm")
    cfg = configured(method, backbone.spec)
    injection = peftbench.apply(method, backbone, cfg, verify=False)
    assert backbone.count_trainable() == method.param_count(cfg, backbone.spec)
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    batch = batch_for(backbone)
    labels = labels_for(backbone, batch)
    if not params:  # `head` on a causal LM trains nothing: there is no task head
        assert method.param_count(cfg, backbone.spec) == 0
        return
    optim = torch.optim.AdamW(params, lr=1e-2)
    first = None
    for _ in range(6):
        optim.zero_grad()
        loss = loss_of(backbone, batch, labels)
        loss.backward()
        optim.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    injection.remove()


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
        assert method.in_default_grid is (name != "topk"), name
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
