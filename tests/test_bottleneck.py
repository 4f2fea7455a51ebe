"""Bottleneck adapters (houlsby, pfeiffer): math, counts, errors, placement, real MiniLM."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHS, assert_same_step, fused_and_module_steps, tiny_backbone, tiny_batch
from transformers import AutoModelForSequenceClassification, RobertaConfig

import peftbench
from peftbench_plugins.bottleneck import Bottleneck

METHODS = ("houlsby", "pfeiffer")
SITES = {"houlsby": ("attn_out", "ffn_out"), "pfeiffer": ("ffn_out",)}
# the paper's non-linearities, written out by hand (not through torch.nn)
ACT = {
    "relu": lambda x: torch.clamp(x, min=0),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "swish": lambda x: x * torch.sigmoid(x),
    "tanh": lambda x: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
}


def adapters_of(backbone, method, layer):
    block = backbone.layer_modules()[layer]
    return {site: getattr(block, f"peftbench_{method}_{site}") for site in SITES[method]}


def inject(backbone, name, **cfg):
    method = peftbench.get_registry().method(name)
    return method, peftbench.apply(method, backbone, cfg)


def perturb(injection, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in injection.named_parameters().items():
            if "peftbench_" in name:  # adapter weights, not the trained LayerNorms
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def roberta_base_spec():
    """roberta-base's spec from its config on the meta device (no weights)."""
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    layout = peftbench.get_registry().layout_for(config)
    return peftbench.Backbone(model, layout, name="roberta-base").spec


# -- the module ------------------------------------------------------------------------------

@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "tanh"])
def test_bottleneck_module_formula(non_linearity):
    torch.manual_seed(0)
    d, m = 12, 5
    module = Bottleneck(d, m, non_linearity=non_linearity)
    h = torch.randn(2, 3, d)
    assert sum(p.numel() for p in module.parameters()) == 2 * d * m + m + d
    assert torch.equal(module(h), h)  # up-projection zero: exact identity
    assert module.down.weight.std().item() == pytest.approx(1e-3, rel=0.5)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    wd, bd, wu, bu = module.down.weight, module.down.bias, module.up.weight, module.up.bias
    expected = h + ACT[non_linearity](h @ wd.T + bd) @ wu.T + bu
    torch.testing.assert_close(module(h), expected, rtol=1e-5, atol=1e-6)


def test_bottleneck_module_init_and_errors():
    torch.manual_seed(0)
    module = Bottleneck(64, 32, init="normal", init_scale=1e-2, dtype=torch.float64)
    assert module.up.weight.dtype == torch.float64
    assert module.up.weight.std().item() == pytest.approx(1e-2, rel=0.2)
    assert not module.up.bias.any() and not module.down.bias.any()
    for kwargs, field in [({"m": 0}, "'m'"), ({"non_linearity": "sigmoid"}, "non_linearity"), ({"init": "xavier"}, "init")]:
        with pytest.raises(peftbench.ConfigError, match=field):
            Bottleneck(**{"d": 8, "m": 2, **kwargs})


# -- method x architecture ---------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method, arch):
    backbone = tiny_backbone(arch)
    batch = tiny_batch()
    with torch.no_grad():
        base = backbone.model(**batch).logits
        inject(backbone, method)
        out = backbone.model(**batch).logits
    torch.testing.assert_close(out, base, rtol=0, atol=1e-5)
    assert torch.equal(out, base)  # h + 0 is h exactly


@pytest.mark.parametrize("method,non_linearity", [("houlsby", "swish"), ("houlsby", "tanh"), ("pfeiffer", "relu"), ("pfeiffer", "gelu")])
def test_site_output_is_the_paper_formula(method, non_linearity, arch):
    """Capture each site's base output h and its final output; final == h + W_up act(W_down h + b_down) + b_up."""
    backbone = tiny_backbone(arch)
    batch = tiny_batch()
    with torch.no_grad():
        base = backbone.model(**batch).logits
    last = backbone.spec.layers - 1
    raw, final, handles = {}, {}, []
    for site in SITES[method]:  # registered before inject: sees the base output
        module = backbone.site(last, site).module
        handles.append(module.register_forward_hook(lambda mod, a, out, s=site: raw.__setitem__(s, out.detach())))
    _, injection = inject(backbone, method, non_linearity=non_linearity, m=3)
    perturb(injection)
    for site in SITES[method]:  # registered after inject: sees the adapted output
        module = backbone.site(last, site).module
        handles.append(module.register_forward_hook(lambda mod, a, out, s=site: final.__setitem__(s, out)))
    out = backbone.model(**batch).logits
    for site, adapter in adapters_of(backbone, method, last).items():
        h = raw[site]
        wd, bd, wu, bu = adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias
        torch.testing.assert_close(final[site], h + ACT[non_linearity](h @ wd.T + bd) @ wu.T + bu, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-4)  # the adapted output flows on to the logits
    # gradients reach every adapter weight and, for houlsby, the LayerNorms; frozen weights get none
    out.float().pow(2).sum().backward()
    params = injection.named_parameters()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    norms = [n for n in params if "peftbench_" not in n]
    assert (len(norms) > 0) == (method == "houlsby")
    mine = {id(p) for p in params.values()} | {id(p) for p in backbone.head_parameters().values()}
    assert all(p.grad is None for p in backbone.model.parameters() if id(p) not in mine)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m,layers", [(1, None), (7, [1]), (32, None), (5, [0, 1])])
def test_counts_match_trainable(method, arch, m, layers):
    backbone = tiny_backbone(arch)
    registry = peftbench.get_registry()
    meth = registry.method(method)
    cfg = meth.config(m=m, layers=layers)
    measured = peftbench.measure(meth, backbone, cfg)
    d, L = backbone.spec.hidden, len(layers or range(backbone.spec.layers))
    norms = sum(backbone.spec.norm_params.values()) if method == "houlsby" else 0
    assert measured == L * (len(SITES[method]) * (2 * d * m + m + d) + norms)


@pytest.mark.parametrize("method", METHODS)
def test_layers_subset_leaves_other_layers_alone(method, arch):
    backbone = tiny_backbone(arch)
    batch = tiny_batch()
    with torch.no_grad():
        base = backbone.model(**batch, output_hidden_states=True).hidden_states
        _, injection = inject(backbone, method, m=4, layers=[1])
        perturb(injection)
        out = backbone.model(**batch, output_hidden_states=True).hidden_states
    blocks = backbone.layer_modules()
    assert not any(n.startswith("peftbench_") for n, _ in blocks[0].named_children())
    assert sorted(n for n, _ in blocks[1].named_children() if n.startswith("peftbench_")) == sorted(
        f"peftbench_{method}_{s}" for s in SITES[method])
    assert torch.equal(out[1], base[1])  # layer 0's output: untouched
    assert not torch.allclose(out[2], base[2], atol=1e-4)  # layer 1's output: adapted


@pytest.mark.parametrize("method", METHODS)
def test_remove_and_save_load(method, arch, tmp_path):
    backbone = tiny_backbone(arch)
    batch = tiny_batch()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    _, injection = inject(backbone, method, m=3, init="normal", init_scale=1e-2)
    perturb(injection)
    with torch.no_grad():
        adapted = backbone.model(**batch).logits
    injection.save(tmp_path)
    injection.remove()
    after = backbone.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m._forward_hooks for m in backbone.model.modules())
    fresh = tiny_backbone(arch, seed=0)
    fresh.freeze()
    peftbench.load_injection(fresh, tmp_path, peftbench.get_registry())
    with torch.no_grad():
        assert torch.equal(fresh.model(**batch).logits, adapted)


# -- counts on roberta-base against the published figures ---------------------------------------

def test_roberta_base_published_counts(roberta_base_spec):
    spec, registry = roberta_base_spec, peftbench.get_registry()
    houlsby, pfeiffer = registry.method("houlsby"), registry.method("pfeiffer")
    assert (spec.hidden, spec.layers, spec.norm_params) == (768, 12, {"attn_norm": 1536, "ffn_norm": 1536})
    # adapters' published counts (reduction factor 16 -> m = 48), adapter weights only
    assert pfeiffer.param_count(pfeiffer.config(reduction_factor=16), spec) == 894_528
    assert houlsby.param_count(houlsby.config(reduction_factor=16, train_layer_norms=False), spec) == 1_789_056
    # the defaults: reduction factor 16; houlsby also trains 2 LayerNorms x 12 layers x 1,536
    assert pfeiffer.param_count(pfeiffer.config(), spec) == 894_528
    assert houlsby.param_count(houlsby.config(), spec) == 1_789_056 + 12 * 2 * 1536
    assert houlsby.param_count(houlsby.config(m=48, train_layer_norms=False), spec) == 1_789_056
    # Houlsby's upper-layer ablation: adapters on the top 6 layers only
    assert pfeiffer.param_count(pfeiffer.config(m=48, layers=list(range(6, 12))), spec) == 894_528 // 2


def test_solver_sets_m_over_reduction_factor(roberta_base_spec):
    houlsby = peftbench.get_registry().method("houlsby")
    cfg = houlsby.config(reduction_factor=8, train_layer_norms=False)
    sol = peftbench.solve(houlsby, cfg, roberta_base_spec, "1789056")
    assert (sol.value, sol.params, sol.reachable) == (48, 1_789_056, True)
    chosen = houlsby.with_knob(cfg, 48)
    assert (chosen.m, chosen.reduction_factor) == (48, None)
    assert houlsby.knob_range(cfg, roberta_base_spec) == (1, 768)


def test_aliases_and_defaults():
    registry = peftbench.get_registry()
    houlsby = registry.method("houlsby")
    assert registry.method("adapter") is houlsby and registry.method("bottleneck") is houlsby
    assert houlsby.knob == "m" and houlsby.default_lr == pytest.approx(1e-3)
    assert houlsby.config().train_layer_norms and not registry.method("pfeiffer").config().train_layer_norms


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cfg,needles", [
    ({"m": 0}, ["'m'", "greater than or equal to 1"]),
    ({"m": 33}, ["'m'", "33", "allowed 1..32"]),
    ({"m": 8, "reduction_factor": 4}, ["'m'", "'reduction_factor'", "not both"]),
    ({"reduction_factor": 64}, ["'reduction_factor'", "allowed reduction_factor 1..32"]),
    ({"non_linearity": "sigmoid"}, ["non_linearity", "'relu'", "'tanh'"]),
    ({"init_scale": 0.5}, ["init_scale", "0.01"]),
    ({"layers": [0, 2]}, ["'layers'", "[2]", "allowed 0..1"]),
    ({"layers": [1, 1]}, ["'layers'", "twice"]),
    ({"bottleneck": 8}, ["bottleneck", "Extra inputs"]),
])
def test_bad_input_names_method_field_and_allowed(method, cfg, needles):
    backbone = tiny_backbone("bert")
    meth = peftbench.get_registry().method(method)
    with pytest.raises(peftbench.ConfigError) as info:
        config = meth.config(cfg)  # value errors: here; range errors: on the backbone
        peftbench.apply(meth, backbone, config)
    message = str(info.value)
    assert f"method {method!r}" in message
    for needle in needles:
        assert needle in message
    with pytest.raises(peftbench.ConfigError):
        meth.param_count(meth.config(cfg), backbone.spec)


# -- the real packaged MiniLM ---------------------------------------------------------------

def test_minilm_forward_backward():
    backbone = peftbench.load_backbone("minilm", registry=peftbench.get_registry())
    method, injection = inject(backbone, "houlsby")
    # d = 384, L = 6, m = 384 // 16 = 24: 12 adapters of 2*384*24 + 24 + 384, plus 12 LayerNorms of 768
    assert backbone.count_trainable() == method.param_count(injection.config, backbone.spec) == 12 * 18_840 + 12 * 768
    batch = backbone.tokenizer(["a fine film", "dull and far too long"], padding=True, return_tensors="pt")
    out = backbone.model(**batch, labels=torch.tensor([1, 0]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in injection.named_parameters().items()}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("up.weight"))


# -- the fused autograd function -------------------------------------------------------------

def _fused_case(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    d, m = 6, 3
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return rand(2, 4, d), rand(m, d), rand(m), rand(d, m), rand(d)


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "silu", "tanh"])
def test_fused_function_gradcheck(non_linearity):
    """Gradients of h, W_down, b_down, W_up, b_up (float64 finite differences); also with h frozen."""
    from torch.autograd import gradcheck

    from peftbench_plugins.bottleneck import _FusedBottleneck

    h, wd, bd, wu, bu = _fused_case()
    fn = lambda *t: _FusedBottleneck.apply(*t, non_linearity)  # noqa: E731
    assert gradcheck(fn, (h, wd, bd, wu, bu))
    frozen = h.detach()
    assert gradcheck(lambda *p: fn(frozen, *p), (wd, bd, wu, bu))
    assert gradcheck(lambda x, w: fn(x, w, bd.detach(), wu.detach(), bu.detach()), (h, wd))  # part of the inputs


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "tanh"])
def test_fused_module_equals_module_path(non_linearity):
    torch.manual_seed(0)
    module = Bottleneck(12, 5, non_linearity=non_linearity)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    h = torch.randn(2, 3, 12, requires_grad=True)
    g = torch.randn(2, 3, 12)
    runs = []
    for fused in (True, False):
        module.fused = fused
        h.grad = None
        module.zero_grad(set_to_none=True)
        out = module(h)
        assert (type(out.grad_fn).__name__ == "_FusedBottleneckBackward") == fused
        out.backward(g)
        runs.append((out.detach(), h.grad, *(p.grad for p in module.parameters())))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "swish", "tanh"])
def test_no_grad_path_equals_module_path(non_linearity):
    """Without a gradient wanted the autograd-free path runs; it gives the module path's output."""
    torch.manual_seed(0)
    module = Bottleneck(12, 5, non_linearity=non_linearity)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    h = torch.randn(2, 3, 12)
    module.fused = False
    reference = module(h).detach()
    module.fused = True
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = module(h)
        assert out.grad_fn is None
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    module.requires_grad_(False)
    out = module(h)  # grad mode, but nothing wants a gradient
    assert out.grad_fn is None
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    assert type(module(h.requires_grad_()).grad_fn).__name__ == "_FusedBottleneckBackward"


FUSED_CASES = [("bert", "houlsby", "swish"), ("bert", "pfeiffer", "gelu"), ("gpt2", "houlsby", "tanh"),
               ("llama", "houlsby", "swish"), ("llama", "pfeiffer", "relu")]


@pytest.mark.parametrize("arch,method,non_linearity", FUSED_CASES)
def test_fused_path_equals_module_path_in_a_model(arch, method, non_linearity):
    """Training step, float32: the fused node gives the module path's outputs and gradients (adapters
    and houlsby's LayerNorms); the site's output really comes from the fused node."""
    backbone = tiny_backbone(arch)
    batch = tiny_batch()
    _, injection = inject(backbone, method, m=4, non_linearity=non_linearity)
    perturb(injection)
    adapters = [m for m in backbone.model.modules() if isinstance(m, Bottleneck)]
    nodes, handles = [], []
    for site in SITES[method]:  # registered after inject: sees the adapted output
        for s in backbone.sites(site):
            handles.append(s.module.register_forward_hook(lambda mod, a, out: nodes.append(type(out.grad_fn).__name__)))

    def check(fused):
        assert len(nodes) == len(adapters)
        assert (set(nodes) == {"_FusedBottleneckBackward"}) if fused else ("_FusedBottleneckBackward" not in nodes)
        nodes.clear()

    forward = lambda: backbone.model(**batch, output_hidden_states=True).hidden_states[-1]  # noqa: E731
    assert_same_step(fused_and_module_steps(backbone, injection, adapters, forward, check))
    for handle in handles:
        handle.remove()


def test_fused_path_falls_back_where_it_cannot_apply():
    """Autocast, a dtype or device mismatch, hooks on the parts, a replaced part, the switch: module path."""
    module = Bottleneck(8, 3, "swish", init="normal", init_scale=1e-2)
    h = torch.randn(2, 8)
    assert module._can_fuse(h) and module.train()._can_fuse(h)  # no dropout: training fuses too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not module._can_fuse(h)
        assert module.delta(h).dtype == torch.bfloat16
        out = module(h)  # the module path: h + the bfloat16 delta
        assert type(out.grad_fn).__name__ == "AddBackward0"
        torch.testing.assert_close(out, h + module.delta(h))
    assert not module._can_fuse(h.double())
    assert not module._can_fuse(h.long())
    handle = module.up.register_forward_hook(lambda mod, a, out: out)
    assert not module._can_fuse(h)
    handle.remove()
    handle = module.act.register_forward_pre_hook(lambda mod, a: None)
    assert not module._can_fuse(h)
    handle.remove()
    assert module._can_fuse(h)
    Bottleneck.fused = False  # the class switch
    try:
        assert not module._can_fuse(h) and type(module(h).grad_fn).__name__ == "AddBackward0"
    finally:
        Bottleneck.fused = True
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: out)  # every module
    try:
        assert not module._can_fuse(h)
    finally:
        handle.remove()
    gelu = Bottleneck(8, 3, "gelu")
    assert gelu._can_fuse(h)
    gelu.act.approximate = "tanh"  # not the GELU the fused function computes (exact, erf)
    assert not gelu._can_fuse(h)
    module.act = torch.nn.ReLU()  # no longer the built activation: the module path applies it
    assert not module._can_fuse(h)
    torch.testing.assert_close(module(h), h + module.up(torch.relu(module.down(h))))
    module = Bottleneck(8, 3, dtype=torch.float64)
    assert module._can_fuse(h.double()) and not module._can_fuse(h)


def test_fused_inference_without_grad():
    """Under no_grad (evaluation) the fused forward runs without building a graph, same numbers."""
    torch.manual_seed(0)
    module = Bottleneck(16, 4, "gelu", init="normal", init_scale=1e-2)
    with torch.no_grad():
        module.up.weight.normal_(0, 0.3)
        h = torch.randn(3, 5, 16)
        fused = module(h)
        module.fused = False
        plain = module(h)
    assert fused.grad_fn is None and fused.shape == h.shape
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
