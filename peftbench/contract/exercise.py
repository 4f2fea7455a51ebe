"""Verification by instantiation that runs the method: applied, counted, one forward and one
backward pass on a short batch of the real backbone, removed. ``peftbench solve`` verifies each
method this way, so a shape bug (a fused slice handled as the whole module) fails there, with the
method's name, rather than in the first training step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from peftbench.contract.apply import apply
from peftbench.errors import VerificationError

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.backbones.backbone import Backbone
    from peftbench.contract.method import Method, MethodConfig

#: what the short batch says (the tokenizer's words; a backbone without a tokenizer gets ids 3..)
TEXTS = ("a short batch", "to verify")


def short_batch(backbone: "Backbone") -> dict[str, torch.Tensor]:
    """Two short sequences for ``backbone`` (its tokenizer when it has one), with labels, on its device."""
    device = next(backbone.model.parameters()).device
    if backbone.tokenizer is not None:
        tok = backbone.tokenizer
        side, tok.padding_side = tok.padding_side, "left" if backbone.spec.is_decoder else "right"
        try:
            batch = dict(tok(list(TEXTS), return_tensors="pt", padding=True))
        finally:
            tok.padding_side = side
        if batch["input_ids"].shape[-1] == 0:  # a tokenizer that drops every word it does not know: ids instead
            batch = None
    if backbone.tokenizer is None or batch is None:
        ids = torch.arange(3, 3 + 2 * 5).remainder(backbone.spec.vocab).view(2, 5)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if backbone.task == "causal_lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


class Exercised(NamedTuple):
    """What ``exercise`` found: the trainable parameters the method made, and why its pass failed
    ("" when it ran: a finite loss, and a gradient on the method's parameters)."""

    measured: int
    failure: str = ""


def exercise(method: "Method", backbone: "Backbone", cfg: "dict[str, Any] | MethodConfig | None" = None) -> Exercised:
    """Apply ``method`` (config checked, counted, not compared: the caller compares), run one forward
    and backward pass on ``short_batch``, remove it. The failure, naming the method and its knob, says
    whether the pass raised, the loss was not finite, or no gradient reached the method's parameters
    (a method that trains some). The backbone is left as it was."""
    injection = apply(method, backbone, cfg, verify=False)
    cfg = injection.config
    knob = f" ({method.knob}={method.knob_value(cfg)})" if method.knob else ""
    where = f"method {method.name!r}{knob}: one forward and backward pass on {backbone.spec.name}"
    was_training = backbone.model.training
    failure = ""
    try:
        backbone.model.train()
        try:
            loss = backbone.model(**short_batch(backbone)).loss
            if not torch.isfinite(loss):
                raise VerificationError(f"{where} gave a loss of {loss.item()}")
            if loss.requires_grad:
                loss.backward()
        except VerificationError:
            raise
        except Exception as exc:  # the method's own bug: name it, not deep inside a model's forward
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise VerificationError(f"{where} failed: {type(exc).__name__}: {first}") from exc
        own = [p for p in injection.named_parameters().values() if p.requires_grad]
        if own and not any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in own):
            raise VerificationError(f"{where}: no gradient reaches the method's {len(own)} parameter tensors")
    except VerificationError as exc:
        failure = str(exc)
    finally:
        backbone.model.zero_grad(set_to_none=True)
        backbone.model.train(was_training)
        injection.remove()
    return Exercised(injection.trainable_params, failure)
