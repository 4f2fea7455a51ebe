"""What ``remove()`` must restore besides tensors, as a comparable snapshot of a model."""

from __future__ import annotations


def _hook_dicts(module) -> dict[str, tuple]:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
             "_load_state_dict_post_hooks")
    return {n: tuple(getattr(module, n, {}).keys()) for n in names if getattr(module, n, None)}


def _attention_functions() -> dict[str, int]:
    from transformers import AttentionInterface, AttentionMaskInterface

    return {f"{kind}:{k}": id(v) for kind, mapping in (("attention", AttentionInterface._global_mapping),
                                                       ("mask", AttentionMaskInterface._global_mapping))
            for k, v in mapping.items()}


def structure(model) -> dict:
    """What ``remove()`` must restore besides tensors: per module its object, type, attributes,
    hooks and attention implementation; the global hooks and attention functions."""
    from torch.nn.modules import module as torch_module

    modules = {}
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        modules[name] = (id(m), type(m).__name__, tuple(sorted(vars(m))), tuple(m._parameters), tuple(m._buffers),
                         _hook_dicts(m), getattr(config, "_attn_implementation", None), m.training)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    globals_ = tuple(len(getattr(torch_module, n, {})) for n in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
    return {"modules": modules, "flags": flags, "global hooks": globals_, "attention functions": _attention_functions()}


def structure_diff(before: dict, after: dict) -> str | None:
    """The first difference between two ``structure`` snapshots, in words; None when they are equal."""
    for name, old in before["modules"].items():
        new = after["modules"].get(name)
        if new is None:
            return f"module {name!r} is gone"
        labels = ("object", "type", "attributes", "parameters", "buffers", "hooks", "attention implementation",
                  "training mode")
        for label, a, b in zip(labels, old, new):
            if a != b:
                if label == "attributes":
                    extra, lost = sorted(set(b) - set(a)), sorted(set(a) - set(b))
                    return f"module {name or '(model)'!r} attributes changed (left behind {extra}, lost {lost})"
                if label == "hooks":
                    return f"module {name or '(model)'!r} still carries hooks: {b} (before: {a})"
                return f"module {name or '(model)'!r}: {label} {a!r} became {b!r}"
    extra = sorted(set(after["modules"]) - set(before["modules"]))
    if extra:
        return f"modules left behind: {extra[:3]}"
    for key in ("flags", "global hooks", "attention functions"):
        if before[key] != after[key]:
            return f"{key} changed"
    return None
