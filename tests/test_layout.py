"""Layouts: every site of every architecture resolves, with the right shapes."""

from __future__ import annotations

import pytest
import torch

import peftbench
from conftest import ARCHS, tiny_backbone, tiny_config

EXPECTED_SITES = {
    "bert": {"q", "k", "v", "attn_out", "ffn_in", "ffn_out", "attn_norm", "ffn_norm", "attention"},
    "roberta": {"q", "k", "v", "attn_out", "ffn_in", "ffn_out", "attn_norm", "ffn_norm", "attention"},
    "distilbert": {"q", "k", "v", "attn_out", "ffn_in", "ffn_out", "attn_norm", "ffn_norm", "attention"},
    "gpt2": {"q", "k", "v", "attn_out", "ffn_in", "ffn_out", "attn_norm", "ffn_norm", "attention"},
    "llama": {"q", "k", "v", "attn_out", "ffn_gate", "ffn_in", "ffn_out", "attn_norm", "ffn_norm", "attention"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_resolve_with_shapes(arch):
    backbone = tiny_backbone(arch)
    spec = backbone.spec
    assert set(backbone.layout.site_names()) == EXPECTED_SITES[arch]
    assert spec.layers == 2 and spec.hidden == 32
    for name in EXPECTED_SITES[arch]:
        sites = backbone.sites(name)
        assert len(sites) == spec.layers
        assert len({id(s.module) for s in sites}) == spec.layers  # one distinct module per layer
    kv = spec.kv_heads * spec.head_dim
    shapes = {"q": (32, 32), "k": (32, kv), "v": (32, kv), "attn_out": (32, 32), "ffn_in": (32, 48), "ffn_out": (48, 32)}
    for name, shape in shapes.items():
        assert spec.site_shapes[name] == shape, (arch, name)
        assert (backbone.site(1, name).in_features, backbone.site(1, name).out_features) == shape
    assert spec.norm_params == {"attn_norm": 32 if arch == "llama" else 64, "ffn_norm": 32 if arch == "llama" else 64}


def test_llama_gqa_dimensions():
    spec = tiny_backbone("llama").spec
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.kv_dim) == (4, 2, 8, 16)


def test_gpt2_fused_qkv_slices():
    backbone = tiny_backbone("gpt2")
    q, k, v = (backbone.site(0, n) for n in ("q", "k", "v"))
    assert q.module is k.module is v.module
    assert peftbench.is_conv1d(q.module)
    assert (q.out_slice, k.out_slice, v.out_slice) == ((0, 32), (32, 64), (64, 96))
    # the slices really are q, k, v: GPT2Attention splits c_attn's output in that order
    x = torch.randn(1, 3, 32)
    out = q.module(x)
    assert torch.equal(out[..., slice(*k.out_slice)], out.split(32, dim=2)[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_base_params_exclude_the_head(arch):
    backbone = tiny_backbone(arch, num_labels=3)
    total = sum(p.numel() for p in {id(p): p for p in backbone.model.parameters()}.values())
    assert backbone.spec.base_params + backbone.spec.head_params == total
    assert backbone.spec.head_params > 0


def test_packaged_minilm_and_smollm2():
    registry = peftbench.get_registry()
    minilm = peftbench.load_backbone("minilm", registry=registry)
    s = minilm.spec
    assert (s.model_type, s.layers, s.hidden, s.heads, s.kv_heads) == ("bert", 6, 384, 12, 12)
    assert s.base_params == 22_713_216 and s.head_params == 384 * 2 + 2
    assert len(minilm.sites("q")) == 6
    smol = peftbench.load_backbone("smollm2", registry=registry)
    s = smol.spec
    assert (s.model_type, s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim) == ("llama", 30, 576, 9, 3, 64)
    assert s.site_shapes["k"] == (576, 192) and s.site_shapes["v"] == (576, 192)
    assert s.is_decoder
    lm = peftbench.load_backbone("smollm2", task="causal_lm", registry=registry)
    assert lm.spec.head_params == 0  # tied LM head: part of the frozen backbone
    assert peftbench.spec_for("smollm2", registry=registry) == s


def test_layout_path_matching_nothing_is_a_clear_error():
    layout = peftbench.ArchLayout(model_type="bert", layers="encoder.layer", sites={"q": "attention.self.quer"},
                                  embeddings="embeddings.word_embeddings")
    model = tiny_backbone("bert").model
    with pytest.raises(peftbench.LayoutError, match="'attention.self.quer'.*matches nothing"):
        peftbench.Backbone(model, layout)


def test_missing_site_is_a_clear_error():
    backbone = tiny_backbone("bert")
    with pytest.raises(peftbench.LayoutError, match="architecture 'bert' has no site 'ffn_gate'"):
        backbone.site(0, "ffn_gate")


def test_unknown_backbone_folder(tmp_path):
    with pytest.raises(peftbench.AssetError, match="no config.json"):
        peftbench.load_backbone(str(tmp_path), registry=peftbench.get_registry())


class Layouts:
    """A registry as the backbone functions see it: anything with ``.layout_for(config)``."""

    def __init__(self):
        self.asked = []

    def layout_for(self, config):
        self.asked.append(config.model_type)
        return peftbench.get_registry().layout_for(config)


def test_backbone_functions_take_the_registry_they_use():
    layouts = Layouts()
    backbone = peftbench.from_config(tiny_config("llama"), registry=layouts)
    assert layouts.asked == ["llama"] and backbone.spec == tiny_backbone("llama").spec
    spec = peftbench.spec_for("minilm", registry=layouts)
    assert layouts.asked == ["llama", "bert"]
    assert peftbench.spec_for("minilm", registry=layouts) is spec and len(layouts.asked) == 2  # cached per registry
    other = Layouts()
    assert peftbench.spec_for("minilm", registry=other) == spec and other.asked == ["bert"]  # not another's answer
    with pytest.raises(TypeError, match="registry"):
        peftbench.from_config(tiny_config("bert"))
    with pytest.raises(TypeError, match="registry"):
        peftbench.spec_for("minilm")
    with pytest.raises(TypeError, match="registry"):
        peftbench.load_backbone("minilm")
