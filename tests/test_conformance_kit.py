"""The shipped conformance kit (peftbench.testing) catches broken third-party methods.

Each planted bug is a small method written as an outside author would (only ``import peftbench``),
broken in one way; the kit must name the method, the backbone and the cause. A well-behaved method
of the same shape passes everything, through ``MethodConformance`` as a third party would use it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftbench
from peftbench.testing import (
    CHECKS,
    ConformanceError,
    MethodConformance,
    architectures,
    check_identity,
    check_method,
    check_monotone,
    check_remove,
    configured,
    tiny_backbone,
)

REGISTRY = peftbench.get_registry()


class LowRank(nn.Module):
    """h + B A x on one linear's output (a third party's own LoRA); ``zero_up`` picks B's init."""

    def __init__(self, base: nn.Module, r: int, d_out: int, out_slice=None, zero_up: bool = True):
        super().__init__()
        d_in, _ = peftbench.linear_shape(base)
        self.base_layer, self.out_slice = base, out_slice
        self.down = nn.Linear(d_in, r, bias=False)
        self.up = nn.Linear(r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        if zero_up:
            nn.init.zeros_(self.up.weight)

    def forward(self, x):
        h = self.base_layer(x)
        delta = self.up(self.down(x))
        if self.out_slice is None:
            return h + delta
        start, end = self.out_slice
        return torch.cat([h[..., :start], h[..., start:end] + delta, h[..., end:]], dim=-1)


class KeyLoRA(peftbench.Method):
    """A rank-r update on every layer's k projection; the class attributes below plant the bugs."""

    name = "key_lora"
    knob = "r"
    zero_up = True  # False: B random although identity_at_init says True (bug a)
    use_slice = True  # False: the fused k slice handled as if it were the whole module (bug d)

    class Config(peftbench.MethodConfig):
        r: int = 2

    def knob_range(self, cfg, spec):
        return 1, min(spec.site_shapes["k"])

    def param_count(self, cfg, spec):
        d_in, d_out = spec.site_shapes["k"]  # a fused slice has its own width here
        return spec.layers * cfg.r * (d_in + d_out)

    def identity_at_init(self, cfg):
        return True

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        for site in backbone.sites("k"):
            out_slice = site.out_slice if self.use_slice else None
            layer = LowRank(site.module, cfg.r, site.out_features, out_slice, zero_up=self.zero_up)
            injection.replace(site.parent, site.attr, layer, owned={"down": layer.down, "up": layer.up})
        return injection


class NotIdentity(KeyLoRA):
    name = "not_identity"
    zero_up = False


class NoSlice(KeyLoRA):
    name = "no_slice"
    use_slice = False


class Scale(peftbench.Method):
    """A learned scale on each layer's FFN output; ``leak_hook`` plants bug b, ``shrink`` bug c."""

    name = "ffn_scale"
    knob = "n"
    leak_hook = False
    shrink = False

    class Config(peftbench.MethodConfig):
        n: int = 1  # the top n layers

    def knob_range(self, cfg, spec):
        return 1, spec.layers

    def param_count(self, cfg, spec):
        n = spec.layers + 1 - cfg.n if self.shrink else cfg.n  # shrink: counts down as the knob grows
        return n * spec.hidden

    def identity_at_init(self, cfg):
        return True

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        sites = backbone.sites("ffn_out")
        n = backbone.spec.layers + 1 - cfg.n if self.shrink else cfg.n
        for site in sites[len(sites) - n:]:
            holder = injection.attach(site.module, "scale", nn.Module())
            holder.g = nn.Parameter(torch.ones(site.out_features))
            hook = lambda module, args, out, g=holder.g: out * g  # noqa: E731
            if self.leak_hook:  # registered on the module directly: remove() knows nothing of it
                site.module.register_forward_hook(hook)
            else:
                injection.add_hook(site.module, hook)
        return injection


class LeakyHook(Scale):
    name = "leaky_hook"
    leak_hook = True


class Shrinking(Scale):
    name = "shrinking"
    shrink = True


# -- the four planted bugs ---------------------------------------------------------------------------
def test_kit_catches_a_method_that_says_identity_at_init_but_is_not():
    backbone = tiny_backbone("bert")
    check_identity(KeyLoRA(), backbone, configured(KeyLoRA(), backbone.spec))  # zero B: the identity
    with pytest.raises(ConformanceError, match=r"method 'not_identity' on tiny-bert \(classification, r=2\): "
                                               r"identity: identity_at_init says the injected model is the bare one, "
                                               r"but hidden states 1 differ by up to"):
        check_identity(NotIdentity(), backbone, configured(NotIdentity(), backbone.spec))


def test_kit_catches_a_hook_left_behind_by_remove():
    backbone = tiny_backbone("llama")
    check_remove(Scale(), backbone, Scale().config(n=2))
    with pytest.raises(ConformanceError, match=r"method 'leaky_hook' on tiny-llama .*: remove: remove\(\) left the "
                                               r"model changed: module '.*mlp\.down_proj' still carries hooks"):
        check_remove(LeakyHook(), backbone, LeakyHook().config(n=2))


def test_kit_catches_a_non_monotone_param_count():
    spec = tiny_backbone("gpt2").spec
    check_monotone(Scale(), spec)
    with pytest.raises(ConformanceError, match=r"method 'shrinking' on tiny-gpt2: monotone: param_count is not "
                                               r"monotone in 'n': n=1 gives 64 parameters but n=2 gives 32"):
        check_monotone(Shrinking(), spec)


def test_kit_catches_the_fused_k_slice_handled_without_out_slice():
    assert check_method(KeyLoRA(), archs=["bert", "gpt2", "llama"], registry=REGISTRY)
    with pytest.raises(ConformanceError) as caught:
        check_method(NoSlice(), archs=["bert", "gpt2", "llama"], registry=REGISTRY)
    lines = str(caught.value).splitlines()
    assert lines and all("tiny-gpt2" in line for line in lines), lines  # bert and llama have a plain k
    assert lines[0].startswith("method 'no_slice' on tiny-gpt2 (classification, r=2): gradients: raised RuntimeError")


# -- the kit itself ---------------------------------------------------------------------------------
def test_tiny_backbones_of_every_registered_architecture():
    assert set(architectures(REGISTRY)) >= {"bert", "roberta", "distilbert", "gpt2", "llama"}
    for arch in architectures(REGISTRY):
        spec = tiny_backbone(arch, registry=REGISTRY).spec
        assert (spec.hidden, spec.layers, spec.heads, spec.vocab) == (32, 2, 4, 64), arch
        assert spec.base_params < 60_000, (arch, spec.base_params)
    llama, gpt2 = tiny_backbone("llama").spec, tiny_backbone("gpt2").spec
    assert (llama.kv_heads, llama.site_shapes["k"]) == (2, (32, 16)), "GQA"
    assert gpt2.site_shapes["k"] == (32, 32) and tiny_backbone("gpt2").sites("k")[0].out_slice == (32, 64)
    with pytest.raises(peftbench.ConfigError, match="no registered architecture 'nope'; registered: bert"):
        tiny_backbone("nope")


def test_a_failing_check_names_every_backbone_it_failed_on():
    with pytest.raises(ConformanceError) as caught:
        check_method(NotIdentity(), archs=["bert", "llama"], checks=["identity"], registry=REGISTRY)
    assert [line.split(", r=")[0] for line in str(caught.value).splitlines()] == [
        "method 'not_identity' on tiny-bert (classification", "method 'not_identity' on tiny-llama (classification",
        "method 'not_identity' on tiny-llama (causal_lm"]  # decoders are checked as causal LMs too
    with pytest.raises(KeyError, match="no conformance check 'nope'; allowed: count"):
        check_method(KeyLoRA(), archs=["bert"], checks=["nope"], registry=REGISTRY)


class GateScale(Scale):
    """Needs a gated FFN (LLaMA's ffn_gate): refuses the other architectures, as it should, clearly."""

    name = "gate_scale"

    def check(self, cfg, spec):
        if "ffn_gate" not in spec.site_shapes:
            raise peftbench.ConfigError(f"method {self.name!r}: {spec.name} has no site 'ffn_gate'")
        super().check(cfg, spec)


def test_a_backbone_the_method_refuses_clearly_is_left_out_not_failed():
    assert check_method(GateScale(), archs=["bert", "llama"], registry=REGISTRY) == [
        "tiny-llama/classification", "tiny-llama/causal_lm"]
    with pytest.raises(ConformanceError, match="(?s)refuses every backbone.*refuses tiny-bert .*no site 'ffn_gate'"):
        check_method(GateScale(), archs=["bert", "gpt2"], registry=REGISTRY)


class TestScaleConformance(MethodConformance):
    """How a third party uses the kit: every check, every registered architecture, and the packaged MiniLM."""

    method = Scale
    real_backbones = ("minilm",)


def test_the_conformance_class_covers_every_check():
    assert set(CHECKS) == {"count", "gradients", "identity", "remove", "save_load", "merge", "monotone", "train"}


def test_the_pytest_plugin_runs_a_conformance_class_on_a_real_backbone(tmp_path):
    """What a third party's test run looks like: one test per check and architecture, and the real
    backbone named on the command line (``--peftbench-real``, from the peftbench pytest plugin)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_third_party.py").write_text(
        "import torch\n"
        "from peftbench.testing import MethodConformance\n\n"
        "torch.set_num_threads(1)\n\n\n"
        "class TestLoRA(MethodConformance):\n"
        "    method = 'lora'\n"
        "    architectures = ('gpt2',)\n"
        "    checks = ('count', 'remove')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(peftbench.__file__).parents[1]), *sys.path]),
           "OMP_NUM_THREADS": "1"}
    # the plugin by module (a checkout); its entry point (an installed peftbench) blocked so it loads once
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:peftbench",
                          "-p", "peftbench.testing.pytest_plugin", "--peftbench-real", "minilm", "-rA",
                          str(tmp_path / "test_third_party.py")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    passed = sorted(line.split("::")[-1] for line in run.stdout.splitlines() if line.startswith("PASSED"))
    assert passed == ["test_check[count-gpt2-causal_lm]", "test_check[count-gpt2]", "test_check[remove-gpt2]",
                      "test_real[minilm]"], run.stdout[-2000:]
