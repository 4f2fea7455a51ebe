"""Placement (``layers``, ``layer_sizes``) for every per-layer method, and the importance allocation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone, tiny_batch
from pydantic import Field

import peftbench
from peftbench.backbones.kv_prefix import _SLOT
from peftbench.contract.placement import parse_layers, resolve_layers
from peftbench.running.allocation import allocated_config, spread, warm_up_scores

PER_LAYER = ("houlsby", "pfeiffer", "adapter_lora", "lora", "qlora", "prefix", "ptuning_v2")
SIZED = ("houlsby", "pfeiffer", "lora", "qlora")  # per-layer count linear in the knob: allocation keeps the total


# -- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,canonical", [
    (None, None), ("all", None), ([3, 1], [1, 3]), ("4, 5", [4, 5]), ("top:2", "top:2"), (" bottom:03", "bottom:3"),
    ("every:2", "every:2"),
])
def test_parse_layers_canonical(value, canonical):
    assert parse_layers(value) == canonical


@pytest.mark.parametrize("value,needle", [
    ("middle:2", "not understood"), ("top:0", ">= 1"), ([1, 1], "twice"), ([-1], "non-negative"), ([], "non-negative"),
    (3, "not understood"), ("top:", "not understood"),
])
def test_parse_layers_bad_input_is_one_line_naming_allowed(value, needle):
    with pytest.raises(ValueError) as info:
        parse_layers(value)
    message = str(info.value)
    assert needle in message and "'top:K', 'bottom:K' or 'every:N'" in message and "\n" not in message


@pytest.mark.parametrize("value,depth,layers", [
    (None, 6, [0, 1, 2, 3, 4, 5]), ("top:3", 6, [3, 4, 5]), ("bottom:2", 6, [0, 1]), ("every:2", 6, [1, 3, 5]),
    ("every:3", 6, [2, 5]), ("every:1", 4, [0, 1, 2, 3]), ([0, 5], 6, [0, 5]), ("top:6", 6, [0, 1, 2, 3, 4, 5]),
])
def test_resolve_layers(value, depth, layers):
    assert resolve_layers(value, depth) == layers


@pytest.mark.parametrize("value,needle", [
    ("top:7", "allowed top:1..top:6"), ("bottom:9", "allowed bottom:1..bottom:6"), ("every:7", "every:1..every:6"),
    ([2, 6], "allowed 0..5"),
])
def test_resolve_layers_beyond_the_model(value, needle):
    with pytest.raises(peftbench.ConfigError, match=needle):
        resolve_layers(value, 6)


# -- every per-layer method --------------------------------------------------------------------

def _layer_of(backbone):
    """Parameter id -> the block index that holds it."""
    return {id(p): i for i, block in enumerate(backbone.layer_modules()) for p in block.parameters()}


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("name", PER_LAYER)
@pytest.mark.parametrize("layers,chosen", [("top:1", [1]), ("bottom:1", [0]), ([1], [1]), (None, [0, 1])])
def test_layers_place_the_method_only_there(name, arch, layers, chosen):
    backbone = tiny_backbone(arch)
    method = peftbench.get_registry().method(name)
    cfg = method.config(layers=layers)
    injection = peftbench.apply(method, backbone, cfg)  # verifies param_count == what inject made
    assert injection.trainable_params == method.param_count(cfg, backbone.spec) > 0
    if name in ("prefix", "ptuning_v2"):  # the table feeds only the chosen attention layers
        fed = [s.layer for s in backbone.sites("attention")
               if _SLOT in s.module.__dict__ and s.module.__dict__[_SLOT].active]
        assert fed == chosen
    else:
        where = _layer_of(backbone)
        head = {id(p) for p in backbone.head_parameters().values()}
        owners = {where.get(id(p)) for p in backbone.model.parameters() if p.requires_grad and id(p) not in head}
        assert owners == set(chosen)
    out = backbone.model(**tiny_batch(left=backbone.spec.is_decoder)).logits
    assert torch.isfinite(out).all()
    injection.remove()


@pytest.mark.parametrize("name", PER_LAYER)
def test_solver_gives_the_budget_to_fewer_layers_as_width(name):
    spec = tiny_backbone("bert").spec  # 2 layers
    method = peftbench.get_registry().method(name)
    every = peftbench.solve_or_raise(method, method.config(), spec, "3%")
    one = peftbench.solve_or_raise(method, method.config(layers="top:1"), spec, "3%")
    assert one.value > every.value or one.updates.get("hidden", 0) > every.updates.get("hidden", 0)
    for sol in (every, one):
        assert abs(sol.params - sol.target) <= sol.step  # within a knob step of the budget


@pytest.mark.parametrize("name", SIZED + ("adapter_lora",))
def test_layer_sizes_are_built_and_counted(name):
    backbone = tiny_backbone("gpt2")  # fused q|k|v: LoRA's sliced wrappers at per-layer ranks
    method = peftbench.get_registry().method(name)
    cfg = method.config(layer_sizes=[2, 5])
    injection = peftbench.apply(method, backbone, cfg)
    assert injection.trainable_params == method.param_count(cfg, backbone.spec)
    assert method.param_count(cfg, backbone.spec) != method.param_count(method.config(layer_sizes=[2, 2]), backbone.spec)
    injection.remove()


@pytest.mark.parametrize("name,cfg,needle", [
    ("lora", {"layer_sizes": [2]}, "1 values for 2 layers"),
    ("lora", {"layer_sizes": [2, 999]}, "allowed 1.."),
    ("houlsby", {"layers": "top:3"}, "allowed top:1..top:2"),
    ("prefix", {"layer_sizes": [2, 2]}, "not allowed"),
    ("ptuning_v2", {"allocation": "importance"}, "not allowed"),
])
def test_bad_placement_is_a_config_error(name, cfg, needle):
    backbone = tiny_backbone("bert")
    method = peftbench.get_registry().method(name)
    with pytest.raises(peftbench.ConfigError, match=needle):
        peftbench.apply(method, backbone, method.config(cfg))


class _Scaled(peftbench.Method):
    """A third-party per-layer method written only against the template: k trained gains on each chosen
    layer's ffn_out, whose mean scales it."""

    name = "scaled_test"
    knob = "k"

    class Config(peftbench.PerLayerConfig):
        k: int = Field(4, ge=1)

    def knob_range(self, cfg, spec):
        return 1, 10_000

    def param_count(self, cfg, spec):
        return sum(self.layer_knobs(cfg, spec).values())

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        for i, k in self.layer_knobs(cfg, backbone.spec).items():
            gain = torch.nn.Parameter(torch.zeros(k))
            holder = torch.nn.Module()
            holder.gain = gain
            injection.attach(backbone.layer_modules()[i], "scaled_test", holder)
            injection.add_hook(backbone.site(i, "ffn_out").module,
                               lambda mod, args, h, g=gain: h * (1 + g.mean()))
        return injection


def test_third_party_method_gets_placement_from_the_template():
    backbone = tiny_backbone("bert")
    method = _Scaled()
    assert peftbench.apply(method, backbone, method.config(layers="bottom:1")).trainable_params == 4
    backbone = tiny_backbone("bert")
    assert peftbench.solve_or_raise(method, method.config(layers=[1]), backbone.spec, "200").value == 200
    assert peftbench.solve_or_raise(method, method.config(), backbone.spec, "200").value == 100
    injection = peftbench.apply(method, backbone, method.config(layer_sizes=[3, 7]))
    assert injection.trainable_params == 10
    with pytest.raises(peftbench.ConfigError, match="'layers'"):
        method.param_count(method.config(layers="every:5"), backbone.spec)


# -- allocation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("units,scores,low,high", [
    (12, [1.0, 2.0, 3.0], 1, 32), (12, [0.0, 0.0, 5.0], 1, 8), (7, [5.0, 1.0, 1.0, 1.0], 1, 4),
    (30, [1e-9, 3.0, 3.0, 10.0, 0.5], 2, 12), (6, [1.0, 1.0, 1.0], 2, 2),
])
def test_spread_keeps_the_total_and_is_monotone(units, scores, low, high):
    sizes = spread(units, scores, low, high)
    assert sum(sizes) == units and all(low <= s <= high for s in sizes)
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j]:
                assert sizes[i] >= sizes[j]


def test_spread_follows_the_scores():
    assert spread(15, [1.0, 1.0, 4.0], 1, 15) == [3, 3, 9]  # 1 each, then 12 units as 1:1:4
    with pytest.raises(peftbench.ConfigError, match="cannot spread"):
        spread(100, [1.0, 1.0], 1, 10)


@pytest.mark.parametrize("name", SIZED)
def test_allocated_config_keeps_the_budget(name):
    backbone = tiny_backbone("bert")
    method = peftbench.get_registry().method(name)
    cfg = method.with_knob(method.config(allocation="importance"), 6)
    out = allocated_config(method, cfg, backbone.spec, {0: 1.0, 1: 3.0})
    assert sum(out.layer_sizes) == 12 and out.layer_sizes[1] > out.layer_sizes[0]
    injection = peftbench.apply(method, backbone, out)
    assert injection.trainable_params == method.param_count(cfg, backbone.spec)


def test_allocation_refuses_a_method_whose_total_would_move():
    spec = tiny_backbone("bert").spec
    method = peftbench.get_registry().method("adapter_lora")  # r(m) rounds: the count is not linear in m
    cfg = method.config(m=3, allocation="importance")
    with pytest.raises(peftbench.ConfigError, match="linear"):
        allocated_config(method, cfg, spec, {0: 1.0, 1: 5.0})


def test_warm_up_scores_every_layer_and_leaves_the_backbone_as_it_was():
    backbone = tiny_backbone("bert")
    method = peftbench.get_registry().method("lora")
    before = {n: p.detach().clone() for n, p in backbone.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 64, (7,), generator=g).tolist(), "labels": int(i % 2)} for i in range(16)]

    def collate(items):
        return {"input_ids": torch.tensor([r["input_ids"] for r in items]),
                "labels": torch.tensor([r["labels"] for r in items])}

    scores = warm_up_scores(method, backbone, method.config(r=2), rows, collate, steps=3, lr=1e-2, batch_size=4,
                            seed=0, device=torch.device("cpu"))
    assert set(scores) == {0, 1} and all(s > 0 for s in scores.values())
    after = backbone.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[n], after[n]) for n in before)
    assert backbone.count_trainable() == 0
