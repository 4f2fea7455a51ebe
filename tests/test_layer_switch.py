"""The injection's per-layer switch (layer ablation), for every registered method on tiny backbones.

With every layer off a per-layer method computes what the plain backbone with the trained head
computes; one layer off changes the output; switched back on, the model is bit for bit as trained
(outputs and state). Methods with nothing per-layer say so. A third-party method built from the
core mechanisms gets the switch without code of its own.
"""

from __future__ import annotations

import pytest
import torch

import peftbench
from conftest import batch_for, tiny_backbone
from peftbench.testing.checks import perturb
from peftbench.testing.conformance import configured

REGISTRY = peftbench.get_registry()

METHODS = sorted(REGISTRY.methods)
#: methods whose layers hold nothing to switch off
NOT_PER_LAYER = {"full", "head", "prompt", "ptuning", "topk", "peft:prompt_tuning", "peft:p_tuning"}


def _logits(backbone, batch):
    """The last hidden state (not the logits: a tiny random head shrinks small changes below the
    tolerance, as scale-type methods such as (IA)^3 or VeRA make them)."""
    backbone.model.eval()
    with torch.no_grad():
        return backbone.model(**batch, output_hidden_states=True).hidden_states[-1]


def _trained_and_loaded(method_name, arch, tmp_path):
    """(plain backbone, backbone with the method's saved, perturbed weights loaded, its injection)."""
    method = REGISTRY.method(method_name)
    source = tiny_backbone(arch)
    injection = peftbench.apply(method, source, configured(method, source.spec))
    perturb(injection)
    injection.save(tmp_path / "adapter")
    loaded = tiny_backbone(arch)
    injection = peftbench.load_injection(loaded, tmp_path / "adapter", REGISTRY)
    return tiny_backbone(arch), loaded, injection


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("name", METHODS)
def test_switch_all_layers_is_plain_backbone_and_restores(name, arch, tmp_path):
    plain, backbone, injection = _trained_and_loaded(name, arch, tmp_path)
    batch = batch_for(backbone)
    if name in NOT_PER_LAYER or not injection.layers():
        assert name in NOT_PER_LAYER, f"{name} should be per-layer"
        assert injection.layers() == []
        with pytest.raises(peftbench.ConfigError, match="not per-layer"):
            injection.disable_layers({0})
        return
    layers = list(range(backbone.spec.layers))
    assert injection.layers() == layers
    trained = _logits(backbone, batch)
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    with injection.layers_disabled(set(layers)):
        assert injection.disabled_layers == set(layers)
        off = _logits(backbone, batch)
    torch.testing.assert_close(off, _logits(plain, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(off, trained, atol=1e-4), "the method changed nothing: the test would prove nothing"
    assert torch.equal(_logits(backbone, batch), trained), "switched back on, the outputs are as trained"
    after = backbone.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    injection.disable_layers({1})
    one_off = _logits(backbone, batch)
    assert not torch.allclose(one_off, trained, atol=1e-5) and not torch.allclose(one_off, off, atol=1e-5)
    with pytest.raises(peftbench.ConfigError, match="switched off"):
        injection.state_dict()
    injection.disable_layers(())
    assert torch.equal(_logits(backbone, batch), trained)
    injection.disable_layers({0})
    injection.remove()  # with a layer off: the backbone comes back as it was, too
    torch.testing.assert_close(_logits(backbone, batch), _logits(plain, batch), rtol=0, atol=0)


def test_out_of_range_layer_and_untrained_base_are_refused():
    backbone = tiny_backbone("bert")
    injection = peftbench.apply(REGISTRY.method("houlsby"), backbone, {"m": 2})
    with pytest.raises(peftbench.ConfigError, match=r"layers \[5\] do not exist"):
        injection.disable_layers({5})
    # trained LayerNorms whose pretrained values were never kept (not loaded from saved weights)
    with pytest.raises(peftbench.ConfigError, match="pretrained values were not kept"):
        injection.disable_layers({0})


class _Scale(peftbench.Method):
    """A third-party method: a scalar gate on every attn_out, by a hook, with an explicit layer."""

    name = "scale_test"
    knob = None

    def param_count(self, cfg, spec):
        return spec.layers

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        for site in backbone.sites("attn_out"):
            gate = torch.nn.Linear(1, 1, bias=False)
            torch.nn.init.constant_(gate.weight, 3.0)
            injection.attach(backbone.layer_modules()[site.layer], "scale", gate)
            injection.add_hook(site.module, lambda m, a, out, g=gate: out * g.weight[0, 0])
        return injection


def test_third_party_method_gets_the_switch():
    plain = tiny_backbone("bert")
    backbone = tiny_backbone("bert")
    injection = peftbench.apply(_Scale(), backbone)
    batch = batch_for(backbone)
    trained = _logits(backbone, batch)
    assert injection.layers() == [0, 1]
    with injection.layers_disabled({0, 1}):
        torch.testing.assert_close(_logits(backbone, batch), _logits(plain, batch), rtol=0, atol=0)
    assert torch.equal(_logits(backbone, batch), trained)


def test_a_method_in_some_layers_switches_only_those(tmp_path):
    """Houlsby in layer 1 only: its switch names layer 1; switching layer 0 off changes nothing, 1 off gives
    the plain backbone with the head (the switch toggles what was injected, wherever the method put it)."""
    method = REGISTRY.method("houlsby")
    source = tiny_backbone("bert")
    injection = peftbench.apply(method, source, method.config({"m": 2, "layers": [1]}))
    perturb(injection)
    injection.save(tmp_path / "adapter")
    backbone = tiny_backbone("bert")
    injection = peftbench.load_injection(backbone, tmp_path / "adapter", REGISTRY)
    plain = tiny_backbone("bert")
    batch = batch_for(backbone)
    assert injection.layers() == [1]
    trained = _logits(backbone, batch)
    with injection.layers_disabled({0}):
        assert torch.equal(_logits(backbone, batch), trained)
    with injection.layers_disabled({1}):
        torch.testing.assert_close(_logits(backbone, batch), _logits(plain, batch), rtol=1e-5, atol=1e-5)
    assert torch.equal(_logits(backbone, batch), trained)
