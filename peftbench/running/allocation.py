"""Budget-preserving adaptive allocation: per-layer sizes from importance measured in a warm-up.

A per-layer method (``contract.placement``) configured with ``allocation: importance`` is planned
and budget-solved as the uniform method (knob k in each of its L chosen layers). Before training,
the trial:

1. applies the uniform method and trains it (and the task head) for ``allocation_steps`` optimizer
   steps of AdamW at the trial's learning rate on the training split;
2. scores each chosen layer by first-order Taylor importance, summed over the warm-up steps and the
   layer's trainable parameters: I_l = sum_t sum_{p in layer l} |p_t * grad_t(p)| (Molchanov et al.,
   2019; AdaLoRA's sensitivity is the same product);
3. removes the method (the backbone comes back bit for bit; the head is reset to its initial weights)
   and spreads the same K = L * k knob units over the layers in proportion to I_l, each layer at
   least the knob's minimum and at most its maximum (largest remainders get the leftover units);
4. trains from scratch with ``layer_sizes`` set, the seed's initialisation restored.

The total is preserved exactly for a method whose per-layer count is linear in the knob with one
slope in every layer (LoRA's r·S, a bottleneck's 2dm + m + d): that is checked with the method's
own ``param_count`` and refused with an error otherwise. The trial's usual check then verifies the
injection made exactly the planned number of parameters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from peftbench.contract.apply import apply
from peftbench.errors import ConfigError

ALLOCATION_FILE = "allocation.json"


def spread(units: int, scores: list[float], low: int, high: int) -> list[int]:
    """``units`` integers over len(scores) slots, each in [low, high], in proportion to ``scores``
    above the floor ``low`` (capped slots give their excess to the rest), summing to ``units``."""
    n = len(scores)
    if not n * low <= units <= n * high:
        raise ConfigError(f"cannot spread {units} knob units over {n} layers with {low}..{high} each")
    sizes = [low] * n
    free = list(range(n))
    left = units - n * low
    while left > 0 and free:
        total = sum(max(scores[i], 0.0) for i in free)
        shares = {i: (left * max(scores[i], 0.0) / total) if total > 0 else left / len(free) for i in free}
        room = {i: high - sizes[i] for i in free}
        capped = [i for i in free if shares[i] >= room[i]]
        if capped:  # fill the capped ones, then share what is left among the others
            for i in capped:
                sizes[i] += room[i]
                left -= room[i]
            free = [i for i in free if i not in capped]
            continue
        whole = {i: math.floor(shares[i]) for i in free}
        for i in free:
            sizes[i] += whole[i]
        left -= sum(whole.values())
        for i in sorted(free, key=lambda i: shares[i] - whole[i], reverse=True)[:left]:
            sizes[i] += 1
        left = 0
    return sizes


def layer_importance(backbone, layers: list[int], grads_seen: dict[int, float]) -> None:
    """Add this step's first-order Taylor importance sum |p * grad p| of each layer's trainable parameters."""
    blocks = backbone.layer_modules()
    head = {id(p) for p in backbone.head_parameters().values()}
    for i in layers:
        score = 0.0
        for p in blocks[i].parameters():
            if p.requires_grad and p.grad is not None and id(p) not in head:
                score += float((p.detach() * p.grad.detach()).abs().sum())
        grads_seen[i] = grads_seen.get(i, 0.0) + score


def warm_up_scores(method, backbone, cfg, train_data, collate, steps: int, lr: float, batch_size: int,
                   seed: int, device) -> dict[int, float]:
    """Importance of each chosen layer after ``steps`` warm-up steps of the uniform ``cfg`` (module docstring).
    The backbone and its task head are left as they were."""
    layers = method.layer_indices(cfg, backbone.spec)
    head = {n: p.detach().clone() for n, p in backbone.head_parameters().items()}
    injection = apply(method, backbone, cfg)
    model = backbone.model
    was_training = model.training
    scores: dict[int, float] = {}
    try:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed)).tolist()
        for step in range(steps):
            picks = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
            batch = collate([train_data[i] for i in picks])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            layer_importance(backbone, layers, scores)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        injection.remove()
        with torch.no_grad():
            for name, p in backbone.head_parameters().items():
                p.copy_(head[name])
        model.train(was_training)
    return {i: scores.get(i, 0.0) for i in layers}


def allocated_config(method, cfg, spec, scores: dict[int, float]):
    """``cfg`` with ``layer_sizes`` spread by ``scores`` over the same knob units as its uniform knob;
    ConfigError when the method's count does not stay the same (a per-layer count not linear in the knob)."""
    layers = method.layer_indices(cfg, spec)
    uniform = method.layer_knobs(cfg, spec)
    low, high = method.knob_range(cfg, spec)
    sizes = spread(sum(uniform.values()), [scores[i] for i in layers], low, high)
    out = method.config(cfg, layer_sizes=sizes)
    before, after = method.param_count(cfg, spec), method.param_count(out, spec)
    if before != after:
        raise ConfigError(f"method {method.name!r}: allocation 'importance' keeps the budget only where each layer's "
                          f"count is linear in {method.knob!r} with one slope; here sizes {sizes} give {after:,} "
                          f"parameters against the uniform {before:,} (allowed: allocation 'uniform')")
    return out


def allocate(method, backbone, trial, data, task, device, folder: Path | None):
    """The trial's method config with ``layer_sizes`` from a warm-up when it asks for ``allocation: importance``
    (else unchanged); the scores and sizes go to ``folder``/allocation.json."""
    from transformers import set_seed

    from peftbench.running.train import collator

    cfg = method.config(trial.method_config)
    if getattr(cfg, "allocation", "uniform") != "importance" or cfg.layer_sizes is not None:
        return trial
    collate = collator(backbone.tokenizer, task.kind, backbone.model)
    train = data["train"]
    scores = warm_up_scores(method, backbone, cfg, train, collate, cfg.allocation_steps, trial.lr,
                            trial.training.batch_size, trial.seed, device)
    out = allocated_config(method, cfg, backbone.spec, scores)
    set_seed(trial.seed)  # the method's initialisation depends on the seed alone, not on the warm-up's draws
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ALLOCATION_FILE).write_text(json.dumps(
            {"score": "first-order Taylor |p * grad p| summed over the warm-up", "steps": cfg.allocation_steps,
             "layers": method.layer_indices(cfg, backbone.spec), "scores": [scores[i] for i in sorted(scores)],
             "uniform": method.knob_value(cfg), "layer_sizes": out.layer_sizes}, indent=1) + "\n")
    return trial.model_copy(update={"method_config": out.model_dump(mode="json")})
