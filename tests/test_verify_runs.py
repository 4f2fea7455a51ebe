"""``peftbench solve`` verifies by running the method: counted, one forward and backward pass on a
short batch of the real backbone, so a shape bug fails there with the method's name; and the solver
reports a param_count that is not monotone in the knob as such (not as a reversed range)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import peftbench
from peftbench.backbones.assets import minilm_dir
from peftbench.cli import main
from peftbench.contract.exercise import exercise
from test_conformance_kit import KeyLoRA, NoSlice, Scale, Shrinking  # the planted third-party methods

from conftest import tiny_backbone


def test_exercise_runs_the_method_and_leaves_the_backbone_as_it_was():
    backbone = tiny_backbone("gpt2")
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method = KeyLoRA()
    assert exercise(method, backbone, {"r": 2}) == (method.param_count(method.config(r=2), backbone.spec), "")
    assert backbone.count_trainable() == 0 and not backbone.model.training
    assert all(torch.equal(v, state[k]) for k, v in backbone.model.state_dict().items())
    measured, failure = exercise(NoSlice(), backbone, {"r": 2})
    assert measured == NoSlice().param_count(NoSlice().config(r=2), backbone.spec)  # the count alone is right
    assert failure.startswith("method 'no_slice' (r=2): one forward and backward pass on tiny-gpt2 failed: "
                              "RuntimeError: The size of tensor a (96) must match the size of tensor b (32)")
    assert [type(m).__name__ for m in backbone.model.modules()].count("LowRank") == 0, "removed after the failure"
    assert exercise(NoSlice(), tiny_backbone("llama"), {"r": 2}).failure == ""  # a plain k: the same code runs


def test_exercise_names_a_method_no_gradient_reaches():
    class Dead(Scale):  # a scale hooked where nothing flows back: its output is detached
        name = "dead"

        def inject(self, backbone, cfg):
            injection = peftbench.Injection(backbone, self, cfg)
            for site in backbone.sites("ffn_out")[-cfg.n:]:
                holder = injection.attach(site.module, "scale", torch.nn.Module())
                holder.g = torch.nn.Parameter(torch.ones(site.out_features))
                injection.add_hook(site.module, lambda m, a, out, g=holder.g: out * g.detach())
            return injection

    assert exercise(Dead(), tiny_backbone("bert"), {"n": 1}) == (32, "method 'dead' (n=1): one forward and backward "
                                                                 "pass on tiny-bert: no gradient reaches the method's "
                                                                 "1 parameter tensors")


def test_solver_reports_a_non_monotone_param_count():
    spec = tiny_backbone("gpt2").spec
    sol = peftbench.solve(Shrinking(), None, spec, "100")
    assert not sol.reachable
    assert sol.note == ("param_count of shrinking is not monotone in n: n=1 gives 64 params but n=2 gives 32; "
                        "the solver needs it non-decreasing in the knob")
    with pytest.raises(peftbench.BudgetError, match="not monotone in n"):
        peftbench.solve_or_raise(Shrinking(), None, spec, "100")
    assert "ffn_scale spans 32..64 params" in peftbench.solve(Scale(), None, spec, "100").note  # monotone: a range


PLUGIN = '''
    import torch
    import peftbench
    from torch import nn


    class NoSlice(peftbench.Method):
        """A rank-r update on k that ignores Site.out_slice (GPT-2's fused c_attn: a shape bug)."""

        name = "no_slice"
        knob = "r"

        class Config(peftbench.MethodConfig):
            r: int = 2

        def knob_range(self, cfg, spec):
            return 1, 8

        def param_count(self, cfg, spec):
            d_in, d_out = spec.site_shapes["k"]
            return spec.layers * cfg.r * (d_in + d_out)

        def inject(self, backbone, cfg):
            injection = peftbench.Injection(backbone, self, cfg)
            for site in backbone.sites("k"):
                down = nn.Linear(site.in_features, cfg.r, bias=False)
                up = nn.Linear(cfg.r, site.out_features, bias=False)  # the slice's width, added to all of c_attn
                holder = injection.attach(site.parent, "no_slice", nn.ModuleDict({"down": down, "up": up}))
                injection.add_hook(site.module, lambda m, args, out, d=down, u=up: out + u(d(args[0])))
            return injection


    @peftbench.hookimpl
    def register_methods(register):
        register(NoSlice)
'''


@pytest.fixture
def gpt2_folder(tmp_path):
    """A small random GPT-2 saved as a local backbone folder (with MiniLM's tokenizer: only ids matter)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, vocab_size=tokenizer.vocab_size,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "no_slice.py").write_text(textwrap.dedent(PLUGIN))
    return tmp_path


def test_solve_fails_a_shape_bug_with_the_methods_name(gpt2_folder, capsys):
    args = ["solve", "--plugins-dir", str(gpt2_folder / "plugins"), "--backbone", str(gpt2_folder / "gpt2"),
            "--methods", "no_slice,lora", "--budget", "1000"]
    assert main([*args, "--json"]) == 1
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lora"]["verified"] is True and rows["no_slice"]["verified"] is False
    assert rows["no_slice"]["note"].startswith("method 'no_slice' (r=")
    assert "one forward and backward pass on " in rows["no_slice"]["note"] and "failed: RuntimeError" in rows["no_slice"]["note"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "NO (failed to run)" in out and "\nno_slice: method 'no_slice' (r=" in out
    assert main([*args[:-4], "--methods", "no_slice", "--budget", "1000", "--no-verify"]) == 0  # counting alone passes it
