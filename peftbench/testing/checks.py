"""The conformance checks: each takes a method, a backbone and a config and raises
``ConformanceError`` (an ``AssertionError``) naming the method, the backbone, the knob and what
broke. Every check leaves the backbone as it found it (the injection is removed).

What each one holds a method to (``CHECKS`` lists them in order):
- ``count``: ``param_count`` equals the parameters requiring grad after ``apply`` (head excluded),
  all of them the injection's own;
- ``gradients``: a backward pass reaches only the method's parameters (one at least) and the head,
  and an optimiser step leaves every frozen tensor bit for bit;
- ``identity``: where ``method.identity_at_init(cfg)``, outputs equal the bare backbone's;
- ``remove``: after a forward, ``remove()`` restores every tensor bit for bit, every
  ``requires_grad`` flag, module and attribute, and leaves no hook and no attention-function change;
- ``save_load``: saved and loaded onto a fresh copy of the backbone, the injection reproduces the
  outputs exactly, and the file holds only the method's tensors and the head;
- ``merge``: where ``method.mergeable``, merged outputs equal unmerged ones, and ``unmerge``
  brings the unmerged outputs back;
- ``monotone``: ``param_count`` never decreases as the knob grows (the solver's bisection needs it);
- ``train``: one optimiser step on a fixed batch lowers the loss.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from typing import Callable

import torch
from safetensors.torch import load_file

import peftbench.backbones.kv_prefix  # noqa: F401  registers its attention function before any snapshot
from peftbench.contract.apply import apply
from peftbench.contract.injection import WEIGHTS_FILE, load_injection
from peftbench.backbones.quant import logical_numel
from peftbench.testing.structure import structure, structure_diff
from peftbench.testing.tiny import labels_for, tiny_batch


class ConformanceError(AssertionError):
    """A method broke the contract: the message names the method, the backbone, the check and the cause."""


class NotApplicable(Exception):
    """The method refuses this backbone with a clear ConfigError (from ``check`` or its config): the
    checks do not apply there. ``check_method`` then needs another backbone that it accepts."""


def _fail(check: str, method, backbone, cfg, detail: str):
    knob = f", {method.knob}={method.knob_value(cfg)}" if method.knob else ""
    raise ConformanceError(f"method {method.name!r} on {backbone.spec.name} ({backbone.task}{knob}): "
                           f"{check}: {detail}")


def perturb(injection, seed: int = 3, added_only: bool = False, scale: float = 0.05) -> None:
    """Move the method's parameters off their initial values (so a zero init cannot hide a bug)."""
    g = torch.Generator().manual_seed(seed)
    params = injection.added_parameters() if added_only else injection.named_parameters()
    with torch.no_grad():
        for p in params.values():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def _no_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _outputs(backbone, batch) -> torch.Tensor:
    with torch.no_grad():
        return backbone.model(**batch).logits


@contextlib.contextmanager
def _restoring(backbone):
    """Put back every tensor of the model (head and trained base weights included) afterwards."""
    saved = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    try:
        yield
    finally:
        backbone.model.zero_grad(set_to_none=True)
        backbone.model.eval()
        backbone.model.load_state_dict(saved)


def _injected(method, backbone, cfg):
    return apply(method, backbone, cfg, verify=False)  # every check compares counts itself


# -- count and gradients --------------------------------------------------------------------
def check_count(method, backbone, cfg) -> None:
    injection = _injected(method, backbone, cfg)
    measured = backbone.count_trainable()
    own = sum(logical_numel(p) for p in injection.named_parameters().values() if p.requires_grad)
    injection.remove()
    if injection.trainable_params != measured:
        _fail("count", method, backbone, cfg, f"apply recorded {injection.trainable_params} trainable parameters, "
              f"{measured:,} require grad")
    expected = method.param_count(cfg, backbone.spec)
    if measured != expected:
        _fail("count", method, backbone, cfg, f"param_count says {expected:,} but {measured:,} parameters "
              f"require grad (difference {measured - expected:+,})")
    if own != measured:
        _fail("count", method, backbone, cfg, f"the injection's named_parameters() hold {own:,} trainable "
              f"parameters but {measured:,} require grad: attach() or replace(owned=) every module it trains")


def check_gradients(method, backbone, cfg) -> None:
    with _restoring(backbone):
        _gradients(method, backbone, cfg)


def _gradients(method, backbone, cfg) -> None:
    injection = _injected(method, backbone, cfg)
    try:
        perturb(injection)
        backbone.model.train()
        _no_dropout(backbone.model)
        own = {id(p) for p in injection.named_parameters().values()}
        head = {id(p) for p in backbone.head_parameters().values()}
        trainable = {id(p): n for n, p in backbone.model.named_parameters() if p.requires_grad}
        stray = sorted(n for i, n in trainable.items() if i not in own | head)
        if stray:
            _fail("gradients", method, backbone, cfg, f"{len(stray)} parameters require grad but are neither "
                  f"the method's nor the head's: {stray[:3]}")
        frozen = {n: t.detach().clone() for n, t in backbone.model.state_dict(keep_vars=True).items()
                  if not (isinstance(t, torch.nn.Parameter) and id(t) in own | head)}
        if not trainable:
            return  # nothing trains (the head alone on a causal LM): nothing to reach
        batch = tiny_batch(backbone)
        loss = backbone.model(**batch, labels=labels_for(backbone, batch)).loss
        loss.backward()
        leaked = [n for n, p in backbone.model.named_parameters() if id(p) not in own | head and p.grad is not None]
        if leaked:
            _fail("gradients", method, backbone, cfg, f"frozen parameters got a gradient: {leaked[:3]}")
        mine = list(injection.named_parameters().values())
        if mine and not any(p.grad is not None and p.grad.abs().sum() > 0 for p in mine):
            _fail("gradients", method, backbone, cfg, "no gradient reaches the method's parameters")
        params = [p for p in backbone.model.parameters() if p.requires_grad]
        if params:
            torch.optim.SGD(params, lr=1e-2).step()
        after = backbone.model.state_dict()
        changed = [n for n, t in frozen.items() if not torch.equal(after[n], t)]
        if changed:
            _fail("gradients", method, backbone, cfg, f"an optimiser step changed frozen tensors: {changed[:3]}")
    finally:
        injection.remove()


# -- identity, remove ------------------------------------------------------------------------
def _states(backbone, batch) -> list[torch.Tensor]:
    """Every layer's hidden states and the logits: a random tiny model's logits alone barely move."""
    with torch.no_grad():
        out = backbone.model(**batch, output_hidden_states=True)
    return [*out.hidden_states, out.logits]


def check_identity(method, backbone, cfg, rtol: float = 1e-6) -> None:
    """Skipped (returns) unless ``method.identity_at_init(cfg)``. Compares every layer's hidden states
    and the logits, up to ``rtol`` times their largest magnitude (float rounding of fused kernels)."""
    if not method.identity_at_init(cfg):
        return
    batch = tiny_batch(backbone)
    before = _states(backbone, batch)
    injection = _injected(method, backbone, cfg)
    try:
        after = _states(backbone, batch)
    finally:
        injection.remove()
    for i, (a, b) in enumerate(zip(after, before)):
        gap, tol = (a - b).abs().max().item(), rtol * max(1.0, b.abs().max().item())
        if not gap <= tol:
            where = "the logits" if i == len(before) - 1 else f"hidden states {i}"
            _fail("identity", method, backbone, cfg, f"identity_at_init says the injected model is the bare one, but "
                  f"{where} differ by up to {gap:.3g} (tolerance {tol:.3g})")


def check_remove(method, backbone, cfg) -> None:
    backbone.freeze()
    batch = tiny_batch(backbone)
    state = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    shape = structure(backbone.model)
    before = _outputs(backbone, batch)
    injection = _injected(method, backbone, cfg)
    perturb(injection, added_only=True)  # trained base weights are the method's to change
    _outputs(backbone, batch)
    injection.remove()
    diff = structure_diff(shape, structure(backbone.model))
    if diff:
        _fail("remove", method, backbone, cfg, f"remove() left the model changed: {diff}")
    after = backbone.model.state_dict()
    if after.keys() != state.keys():
        _fail("remove", method, backbone, cfg, f"state keys changed: {sorted(set(after) ^ set(state))[:3]}")
    changed = [k for k, v in state.items() if not torch.equal(after[k], v)]
    if changed:
        _fail("remove", method, backbone, cfg, f"tensors not restored bit for bit: {changed[:3]}")
    if not torch.equal(_outputs(backbone, batch), before):
        _fail("remove", method, backbone, cfg, "outputs after remove() differ from the bare model's")


# -- save/load, merge --------------------------------------------------------------------------
class _One:
    """A registry of one method, for ``load_injection`` (the method need not be installed)."""

    def __init__(self, method):
        self._method = method

    def method(self, name: str):
        return self._method


def check_save_load(method, backbone, cfg) -> None:
    with _restoring(backbone):
        _save_load(method, backbone, cfg)


def _save_load(method, backbone, cfg) -> None:
    fresh = copy.deepcopy(backbone)  # the same base weights, before anything is injected
    injection = _injected(method, backbone, cfg)
    try:
        perturb(injection)
        with torch.no_grad():
            for p in backbone.head_parameters().values():
                p.add_(0.1)
        injection.finalize()
        batch = tiny_batch(backbone)
        expected = _outputs(backbone, batch)
        with tempfile.TemporaryDirectory() as folder:
            injection.save(folder)
            saved = set(load_file(f"{folder}/{WEIGHTS_FILE}"))
            head = {f"head.{n}" for n in backbone.head_parameters()}
            if saved != set(injection.state_dict()) | head:
                extra = sorted(saved - set(injection.state_dict()) - head)
                _fail("save_load", method, backbone, cfg, f"the file holds other tensors than the method's and the "
                      f"head's (extra {extra[:3]}, missing {sorted(set(injection.state_dict()) - saved)[:3]})")
            with torch.no_grad():
                for p in fresh.head_parameters().values():
                    p.zero_()
            loaded = load_injection(fresh, folder, _One(method))
        got = _outputs(fresh, batch)
        loaded.remove()
    finally:
        injection.remove()
    if not torch.equal(got, expected):
        gap = (got - expected).abs().max().item()
        _fail("save_load", method, backbone, cfg, f"the loaded injection's outputs differ from the saved one's "
              f"by up to {gap:.3g}")


def check_merge(method, backbone, cfg, rtol: float = 1e-4) -> None:
    """Skipped (returns) unless ``method.mergeable``. 4-bit bases are requantised when merged: their
    tolerance is the method's to widen by calling this with a larger ``rtol``."""
    if not method.mergeable:
        return
    batch = tiny_batch(backbone)
    injection = _injected(method, backbone, cfg)
    try:
        perturb(injection)
        unmerged = _outputs(backbone, batch)
        injection.merge()
        merged = _outputs(backbone, batch)
        injection.unmerge()
        again = _outputs(backbone, batch)
    finally:
        injection.remove()
    scale = max(1.0, unmerged.abs().max().item())
    gap = (merged - unmerged).abs().max().item()
    if not gap <= rtol * scale:
        _fail("merge", method, backbone, cfg, f"merged outputs differ from unmerged ones by up to {gap:.3g} "
              f"(tolerance {rtol * scale:.3g})")
    back = (again - unmerged).abs().max().item()
    if not back <= 1e-6 * scale:
        _fail("merge", method, backbone, cfg, f"after unmerge() outputs differ from before merge() by {back:.3g}")


# -- the knob, training ------------------------------------------------------------------------
def check_monotone(method, spec, cfg=None, samples: int = 48) -> None:
    """``param_count`` is non-decreasing in the knob over ``knob_range`` (all values, or ``samples``
    evenly spread ones in a wide range). Knob-less methods pass."""
    if method.knob is None:
        return
    cfg = method.config(cfg)
    allowed = method.knob_values(cfg, spec)  # a method whose knob takes listed values only (block sizes)
    if allowed:
        allowed = sorted(allowed)
        values = allowed if len(allowed) <= samples else \
            sorted({allowed[(len(allowed) - 1) * i // (samples - 1)] for i in range(samples)})
    else:
        lo, hi = method.knob_range(cfg, spec)
        values = range(lo, hi + 1) if hi - lo < samples else \
            sorted({lo + (hi - lo) * i // (samples - 1) for i in range(samples)})
    previous = None
    for value in values:
        count = method.param_count(method.with_knob(cfg, value), spec)
        if previous is not None and count < previous[1]:
            raise ConformanceError(
                f"method {method.name!r} on {spec.name}: monotone: param_count is not monotone in {method.knob!r}: "
                f"{method.knob}={previous[0]} gives {previous[1]:,} parameters but {method.knob}={value} gives "
                f"{count:,} (the budget solver needs it non-decreasing)")
        previous = (value, count)


def check_train(method, backbone, cfg, lr: float = 1e-3) -> None:
    """One AdamW step (``lr``) on a fixed batch lowers the loss (dropout off). Methods that train
    nothing (the head alone on a causal LM) pass."""
    with _restoring(backbone):
        _train(method, backbone, cfg, lr)


def _train(method, backbone, cfg, lr: float) -> None:
    torch.manual_seed(0)
    injection = _injected(method, backbone, cfg)
    try:
        backbone.model.train()
        _no_dropout(backbone.model)
        params = [p for p in backbone.model.parameters() if p.requires_grad]
        if not params:
            return
        optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        batch = tiny_batch(backbone)
        labels = labels_for(backbone, batch)
        first = backbone.model(**batch, labels=labels).loss
        first.backward()
        optim.step()
        with torch.no_grad():
            second = backbone.model(**batch, labels=labels).loss
        if not (torch.isfinite(second) and second.item() < first.item()):
            _fail("train", method, backbone, cfg, f"one optimiser step (AdamW, lr {lr:g}) did not lower the loss: "
                  f"{first.item():.6f} -> {second.item():.6f}")
    finally:
        injection.remove()


#: name -> check(method, backbone, cfg); ``monotone`` takes the spec: see ``run_check``
CHECKS: dict[str, Callable] = {
    "count": check_count, "gradients": check_gradients, "identity": check_identity, "remove": check_remove,
    "save_load": check_save_load, "merge": check_merge, "monotone": check_monotone, "train": check_train,
}


def run_check(name: str, method, backbone, cfg) -> None:
    """Run the check ``name`` (one of ``CHECKS``) of ``method`` at ``cfg`` on ``backbone``."""
    if name not in CHECKS:
        raise KeyError(f"no conformance check {name!r}; allowed: {', '.join(CHECKS)}")
    try:
        if name == "monotone":
            return check_monotone(method, backbone.spec, cfg)
        return CHECKS[name](method, backbone, cfg)
    except (ConformanceError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the method crashed (a shape bug in its forward ...): name it
        _fail(name, method, backbone, cfg, f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
