"""The peft bridge (``peft:<tuner>``): every bridged tuner on every tiny architecture solves, verifies,
trains a step, merges, saves, loads and is removed without a trace; peft:lora equals our lora at equal
weights."""

from __future__ import annotations

import pytest
import torch

import peftbench
from peftbench_plugins import peft_bridge
from tests.conftest import ARCHS, batch_for, tiny_backbone


def _registry():
    """Every installed plugin, plus the bridge where the installed metadata predates its entry point."""
    reg = peftbench.get_registry()
    return reg if "peft:lora" in reg.methods else peftbench.get_registry(extra=[peft_bridge])


REG = _registry()
BRIDGED = [f"peft:{t.name}" for t in peft_bridge.TUNERS]
#: (method, arch) where peft itself has no layer for the targeted module type: a ConfigError naming the method
UNSUPPORTED = {(f"peft:{t}", "gpt2") for t in ("loha", "lokr", "oft", "boft")}  # no layer for Conv1D


def _output(backbone, batch):
    with torch.no_grad():
        return backbone.model(**batch).logits


def _state(backbone):
    return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", BRIDGED)
def test_solve_train_merge_roundtrip_remove(name, arch, tmp_path):
    method = REG.method(name)
    backbone = tiny_backbone(arch, registry=REG)
    batch = batch_for(backbone)
    before, attributes = _state(backbone), set(vars(backbone.model))
    cfg = method.config()
    if (name, arch) in UNSUPPORTED:
        with pytest.raises(peftbench.ConfigError, match=name):
            peftbench.apply(method, backbone, cfg)
        return
    if method.knob:  # the solver finds a knob value that peft builds, and its count is exact
        lo, hi = method.knob_range(cfg, backbone.spec)
        values = method.knob_values(cfg, backbone.spec) or list(range(lo, hi + 1))
        goal = values[len(values) // 2]
        target = method.param_count(method.with_knob(cfg, goal), backbone.spec)
        sol = peftbench.solve(method, cfg, backbone.spec, str(target))
        assert sol.reachable and sol.params == target, sol
        cfg = method.with_knob(cfg, sol.value)
    injection = peftbench.apply(method, backbone, cfg)  # verifies param_count against requires_grad
    assert injection.trainable_params == method.param_count(cfg, backbone.spec) > 0
    assert set(injection.named_parameters()) and all(p.requires_grad for p in injection.named_parameters().values())

    # one training step moves the method's parameters (and the head) and nothing of the base
    base_before = {k: v for k, v in _state(backbone).items() if "base_layer" in k}
    params = {**injection.named_parameters(), **backbone.head_parameters()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    backbone.model.train()
    start = {k: p.detach().clone() for k, p in injection.named_parameters().items()}
    labels = torch.tensor([0, 1, 1])
    loss = backbone.model(**batch, labels=labels).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in injection.named_parameters().values())
    opt.step()
    backbone.model.eval()
    assert any(not torch.equal(start[k], p) for k, p in injection.named_parameters().items())
    assert all(torch.equal(v, _state(backbone)[k]) for k, v in base_before.items())
    trained = _output(backbone, batch)

    if method.mergeable:  # merged equals unmerged; unmerging restores the weights bit for bit
        state = _state(backbone)
        injection.merge()
        torch.testing.assert_close(_output(backbone, batch), trained, atol=1e-4, rtol=1e-4)
        injection.unmerge()
        assert all(torch.equal(v, _state(backbone)[k]) for k, v in state.items())

    # save, load onto a fresh backbone of the same seed: same outputs
    injection.save(tmp_path / "adapter")
    fresh = tiny_backbone(arch, registry=REG)
    loaded = peftbench.load_injection(fresh, tmp_path / "adapter", REG)
    torch.testing.assert_close(_output(fresh, batch), trained)
    loaded.remove()

    injection.remove()  # every base tensor back (the head trained), no module or attribute left
    after, head = _state(backbone), set(backbone.head_parameters())
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before if k not in head)
    assert set(vars(backbone.model)) == attributes
    assert not any(type(m).__module__.startswith("peft.") for m in backbone.model.modules())


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt2"])  # gpt2: ours slices q|v, peft takes c_attn whole
def test_peft_lora_equals_our_lora_at_equal_weights(arch):
    batch = None
    outputs = []
    for name, cfg in (("lora", {"r": 4, "alpha": 16.0}), ("peft:lora", {"r": 4, "options": {"lora_alpha": 16}})):
        backbone = tiny_backbone(arch, registry=REG)
        batch = batch or batch_for(backbone)
        injection = peftbench.apply(REG.method(name), backbone, cfg)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # the same A and B in both, in the order of the sites (layer, then q, v)
            for key, p in sorted(injection.named_parameters().items(), key=lambda kv: _site_order(kv[0])):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        outputs.append(_output(backbone, batch))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def _site_order(key: str) -> tuple:
    """(layer, q before v, A before B) of a LoRA parameter name, ours or peft's."""
    layer = int(next(p for p in key.split(".") if p.isdigit()))
    site = 0 if any(s in key for s in ("query", "q_lin", "q_proj")) else 1
    return layer, site, 0 if "lora_A" in key else 1


def test_bad_inputs_get_one_line_errors():
    backbone = tiny_backbone("bert", registry=REG)
    vera = REG.method("peft:vera")
    with pytest.raises(peftbench.ConfigError, match="field 'options' sets \\['r'\\]"):
        peftbench.apply(vera, backbone, {"options": {"r": 4}})
    with pytest.raises(peftbench.ConfigError, match="targets"):
        vera.config(targets=["q", "nowhere"])
    with pytest.raises(peftbench.ConfigError, match="ffn_gate"):
        peftbench.apply(REG.method("peft:loha"), backbone, {"targets": ["ffn_gate"]})
    with pytest.raises(peftbench.ConfigError, match="not allowed on .*allowed 1, 2, 4"):
        peftbench.apply(REG.method("peft:oft"), backbone, {"oft_block_size": 3})
    with pytest.raises(peftbench.ConfigError, match="VeraConfig refuses"):
        peftbench.apply(vera, backbone, {"options": {"no_such_field": 1}})


def test_knob_less_tuners_are_solved_apart():
    spec = tiny_backbone("llama", registry=REG).spec
    for name in ("peft:ia3", "peft:ln_tuning"):
        sol = peftbench.solve(REG.method(name), {}, spec, "1%")
        assert sol.knob is None and sol.target is None and sol.note == "budget does not apply" and sol.params > 0


def _adalora_step(model, batch, labels, opt):
    loss = model(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    return loss


def test_adalora_allocates_ranks_as_peft_does():
    """peft:adalora with the runner's call after each step prunes the same singular values, with the same
    penalised loss, as peft's own AdaLoraModel loop (forward with its orthogonality penalty, then
    update_and_allocate)."""
    import peft

    steps, init_r, target_r = 8, 4, 2
    labels = torch.tensor([0, 1, 1])
    ours, theirs = tiny_backbone("bert", registry=REG), tiny_backbone("bert", registry=REG)
    batch = batch_for(ours)
    injection = peftbench.apply(REG.method("peft:adalora"), ours,
                                {"init_r": init_r, "options": {"target_r": target_r, "tfinal": 2}})
    paths = sorted({s.path for n in ("q", "v") for s in theirs.sites(n)})
    config = peft.AdaLoraConfig(init_r=init_r, target_r=target_r, tfinal=2, total_step=steps, target_modules=paths)
    reference = peft.get_peft_model(theirs.model, config)
    ref_params = dict(reference.named_parameters())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the same start: random A, B and E (E non-zero so that every value has a gradient)
        for key, p in injection.named_parameters().items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            ref_params[f"base_model.model.{key}"].copy_(p)
    for key in ours.head_parameters():  # the head trains with every method (the same initial weights: same seed)
        ref_params[f"base_model.model.{key}"].requires_grad_(True)
    for model in (ours.model, reference):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (ours.model, reference)]
    ours.model.train(), reference.train()
    for step in range(steps):
        mine = _adalora_step(ours.model, batch, labels, opts[0])
        injection.after_optimizer_step(step, steps)
        ref = _adalora_step(reference.base_model, batch, labels, opts[1])  # AdaLoraModel.forward: the penalty
        reference.base_model.update_and_allocate(step)
        torch.testing.assert_close(mine, ref)  # the penalty is in both losses
        for o in opts:
            o.zero_grad()
    ranks = injection.ranks()
    assert sum(ranks.values()) == target_r * len(ranks) and max(ranks.values()) <= init_r
    for key, p in injection.named_parameters().items():
        if "lora_E" in key:
            assert torch.equal(p == 0, ref_params[f"base_model.model.{key}"] == 0)
            torch.testing.assert_close(p, ref_params[f"base_model.model.{key}"])
    injection.remove()
    assert not ours.model._forward_hooks


def test_adalora_allocator_runs_inside_a_trial(tmp_path, registry):
    """The runner calls the injection after each optimizer step: the saved AdaLoRA weights keep target_r
    singular values per module on average (the rest masked to zero). One validation pass, at the end: the
    trial keeps its best validation state, which may come from before the allocation finished."""
    from safetensors.torch import load_file

    from peftbench.results.records import TrainingSpec
    from peftbench.running.execute import execute_trial
    from peftbench.running.options import RunOptions
    from peftbench.running.plan import trial_spec
    from peftbench.tasks.entry import TaskEntry
    from run_helpers import make_sentiment_csv, make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-bert")
    data = make_sentiment_csv(tmp_path / "reviews.csv", rows=60)
    training = TrainingSpec(max_steps=6, eval_every=6, batch_size=8, max_length=40,
                            train_limit=None, eval_limit=None, test_limit=None)
    entry = TaskEntry(name=f"file:{data}", text_columns=["review"], label_column="sentiment")
    spec = trial_spec(REG, task=entry, backbone=str(model), method="peft:adalora",
                      method_config={"init_r": 3, "options": {"target_r": 1, "tfinal": 1}}, lr=1e-2, training=training)
    outcome = execute_trial(spec, RunOptions(threads=1, quiet=True), str(tmp_path / "trial"), REG)
    assert outcome.status == "done", outcome.error
    weights = load_file(tmp_path / "trial" / "adapter" / "adapter_model.safetensors")
    values = [w for k, w in weights.items() if "lora_E" in k]
    assert len(values) == 4 and sum(int((w != 0).sum()) for w in values) == 4  # 2 layers x (q, v), 1 each on average
