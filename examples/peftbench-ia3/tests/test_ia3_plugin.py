"""The (IA)^3 plugin holds to peftbench's contract (the shipped conformance kit, every registered
architecture) and computes what peft's own IA3 computes at equal weights."""

from __future__ import annotations

import pytest
import torch

import peftbench
import peftbench_ia3
from peftbench.testing import MethodConformance, check_method, perturb, tiny_backbone, tiny_batch

torch.set_num_threads(1)  # tiny models: threads only add overhead


def registry():
    """Every installed plugin; this one added by hand when it is not installed (a checkout's test run)."""
    installed = peftbench.get_registry()
    return installed if "ia3" in installed.methods else peftbench.get_registry(extra=[peftbench_ia3])


class TestIA3Conformance(MethodConformance):
    """count, gradients, identity at init, remove, save/load, merge, monotone, one training step."""

    method = peftbench_ia3.IA3
    real_backbones = ("minilm",)  # the packaged MiniLM too (count, gradients, remove, one training step)


def test_registered_under_its_name():
    reg = registry()
    assert isinstance(reg.method("ia3"), peftbench_ia3.IA3)
    assert {f["name"] for f in reg.method("ia3").describe()["config"]} == {"attention", "feedforward"}


def test_sizes_on_fused_and_gqa_layouts():
    method = peftbench_ia3.IA3()
    gpt2, llama = tiny_backbone("gpt2").spec, tiny_backbone("llama").spec
    assert method.param_count(method.config(), gpt2) == 2 * (32 + 32 + 48)  # fused c_attn slices, n_inner
    assert method.param_count(method.config(), llama) == 2 * (16 + 16 + 48)  # GQA: 2 kv heads of 8
    assert method.param_count(method.config(feedforward=False), llama) == 2 * 32
    with pytest.raises(peftbench.ConfigError, match="field 'attention' names \\['o'\\]"):
        peftbench.apply(method, tiny_backbone("bert"), {"attention": ["o"]})


def test_a_config_without_the_ffn_conforms_too():
    assert check_method(peftbench_ia3.IA3(), cfg={"attention": ["v"], "feedforward": False},
                        archs=["gpt2", "llama"], checks=["count", "remove", "merge", "save_load"])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_equals_peft_ia3_at_equal_weights(arch):
    import peft  # a dependency of peftbench
    ours = tiny_backbone(arch)
    reference = tiny_backbone(arch)  # same seed: same weights
    batch = tiny_batch(ours)
    injection = peftbench.apply(peftbench_ia3.IA3(), ours, None)
    perturb(injection, scale=0.3)
    if arch == "bert":  # BERT's attention.output.dense is not the FFN: name the FFN output exactly
        config = peft.IA3Config(target_modules=r".*(key|value|layer\.\d+\.output\.dense)$",
                                feedforward_modules=r".*layer\.\d+\.output\.dense$")
    else:
        config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = peft.get_peft_model(reference.model, config)
    theirs = {n: p for n, p in model.named_parameters() if "ia3_l" in n}
    with torch.no_grad():
        for layer, block in enumerate(ours.layer_modules()):
            vectors = getattr(block, "peftbench_ia3")
            for name, value in (("k", vectors["k"]), ("v", vectors["v"]), ("ff", vectors["ff"])):
                path = {"k": ours.site(layer, "k").path, "v": ours.site(layer, "v").path,
                        "ff": ours.site(layer, "ffn_out").path}[name]
                key = next(n for n in theirs if n.split(".ia3_l")[0].endswith(path))
                theirs[key].copy_(value.view_as(theirs[key]))
    with torch.no_grad():
        got = ours.model(**batch).logits
        want = model(**batch).logits
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
