"""What step_time.py measures: backbones, batches, and one trainable model per contender.

A contender is a model ready for a training step: ``floor`` (frozen backbone, one trainable
scalar on the embedding output, so backward walks every layer), a peftbench method solved to
the budget, or peft's equivalent of one of ours built from the same configuration and
carrying the same weights. Every contender trains the task head too (peft: its
``modules_to_save`` copy), so the head's cost is common to all of them.

Contenders that leave the base weights alone share those tensors with the base backbone (a
deepcopy whose memo maps each frozen parameter to itself); the ones that write base weights
or their ``requires_grad`` (full, houlsby's LayerNorms, topk, peft LoRA's in-place merge)
get their own copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import peftbench
import torch
from torch import nn

from peft_compat import bridge_cache_argument

# -- backbones ---------------------------------------------------------------------------------
#: name -> (batch, length, task); bert-base-shape and tiny-* are random, built from configs
BACKBONES = {
    "minilm": (16, 128, "classification"),
    "bert-base-shape": (16, 128, "classification"),
    "smollm2": (4, 128, "causal_lm"),
    "tiny-bert": (2, 8, "classification"),
    "tiny-llama": (2, 8, "causal_lm"),
}


def load(name: str) -> peftbench.Backbone:
    from transformers import BertConfig, LlamaConfig

    _, _, task = BACKBONES[name]
    if name == "bert-base-shape":  # bert-base dimensions, random weights: no download
        return peftbench.from_config(BertConfig(), task=task, name=name, registry=peftbench.get_registry())
    if name == "tiny-bert":
        config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=128)
        return peftbench.from_config(config, task=task, name=name, registry=peftbench.get_registry())
    if name == "tiny-llama":
        config = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return peftbench.from_config(config, task=task, name=name, registry=peftbench.get_registry())
    return peftbench.load_backbone(name, task=task, registry=peftbench.get_registry())


def make_batch(backbone: peftbench.Backbone, batch: int, length: int, seed: int = 0) -> dict:
    """Random ids, padded like the runner pads (encoders right, decoders left): rows keep 50-100%."""
    g = torch.Generator().manual_seed(seed)
    spec = backbone.spec
    ids = torch.randint(3, spec.vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    keep = torch.randint(length // 2, length + 1, (batch,), generator=g)
    keep[0] = length  # one full row: the batch is as long as its longest row
    for row, k in enumerate(keep.tolist()):
        pad = slice(0, length - k) if spec.is_decoder else slice(k, length)
        mask[row, pad] = 0
    pad_id = backbone.config.pad_token_id or 0
    ids[mask == 0] = pad_id
    out = {"input_ids": ids, "attention_mask": mask}
    if backbone.task == "causal_lm":
        out["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        out["labels"] = torch.randint(0, backbone.config.num_labels, (batch,), generator=g)
    return out


def lengthen(batch: dict, n: int, seed: int = 1) -> dict:
    """The batch a model sees after n virtual tokens are prepended (attended, no loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = batch["input_ids"]
    head = torch.randint(3, int(ids.max()) + 1, (ids.shape[0], n), generator=g).to(ids.device)
    out = {"input_ids": torch.cat([head, ids], 1),
           "attention_mask": torch.cat([torch.ones_like(head), batch["attention_mask"]], 1)}
    labels = batch["labels"]
    out["labels"] = torch.cat([torch.full_like(head, -100), labels], 1) if labels.dim() == 2 else labels
    return out


def clone(backbone: peftbench.Backbone, share: bool) -> peftbench.Backbone:
    """A copy of ``backbone``; with ``share`` its frozen base tensors are the same objects."""
    memo = {}
    if share:
        head = {id(p) for p in backbone.head_parameters().values()}
        for t in (*backbone.model.parameters(), *backbone.model.buffers()):
            if id(t) not in head:
                memo[id(t)] = t
    model = copy.deepcopy(backbone.model, memo)
    return peftbench.Backbone(model, backbone.layout, name=backbone.name, task=backbone.task)


# -- contenders --------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str  # floor, floor+20, full, lora, peft:lora ...
    kind: str  # baseline | ours | peft
    model: nn.Module
    batch: dict
    trainable: int  # trainable parameters, task head excluded
    config: str = ""
    note: str = ""
    method: str | None = None  # our method name (ours and peft rows)
    injection: peftbench.Injection | None = None
    virtual_tokens: int = 0  # n tokens an input prompt adds to the sequence
    quantized_fraction: float | None = None  # qlora: bytes of its 4-bit base weights / their fp32 bytes
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


#: our methods compared with peft (their peft equivalent is built from the same config)
PEFT_PEERS = ("lora", "prefix", "ptuning_v2", "prompt", "ptuning")
#: contenders that need their own copy of the base weights
OWN_COPY = {"full", "houlsby", "topk", "peft:lora"}
INPUT_PROMPTS = ("prompt", "ptuning")


def default_names(backbone: peftbench.Backbone, registry) -> list[str]:
    ours = ["lora", "prefix", "ptuning_v2", "prompt", "ptuning", "houlsby", "pfeiffer", "adapter_lora", "qlora", "topk"]
    if backbone.task == "classification":
        ours.append("head")
    names = ["floor", "full"] + [m for m in ours if m in registry.methods]
    return names + [f"peft:{m}" for m in PEFT_PEERS if m in names]


def solved_config(method: peftbench.Method, spec: peftbench.BackboneSpec, budget: str, length: int | None = None):
    """(config, description): the knob at the budget, or the method's default when that is unusable.

    Unusable: out of the knob's range, or (``length`` given) an input prompt longer than the
    input itself: on a long-context model a 1% soft prompt is thousands of virtual tokens,
    which measures the sequence length, not the method.
    """
    cfg = method.config({})
    if not method.budgeted or method.knob is None:
        return cfg, "not budgeted"
    sol = peftbench.solve(method, cfg, spec, budget)
    default = method.knob_value(cfg)
    if not sol.reachable:
        return cfg, (f"{method.knob}={default} (default: {budget} unreachable, "
                     f"{method.knob} {sol.knob_low}..{sol.knob_high} spans {sol.low:,}..{sol.high:,} params)")
    if length is not None and method.name in INPUT_PROMPTS and sol.value > length:
        return cfg, f"{method.knob}={default} (default: {budget} gives {method.knob}={sol.value} > {length} input tokens)"
    return method.with_knob(cfg, sol.value), f"{method.knob}={sol.value}"


def build(name: str, base: peftbench.Backbone, batch: dict, budget: str, registry, share: bool = True,
          ours: dict[str, Contender] | None = None) -> Contender:
    """One contender. ``peft:<m>`` copies the weights of ``ours[m]`` when given.

    ``share``: other contenders live in this process, so build on a copy of ``base`` (sharing
    its frozen tensors unless the contender writes them); otherwise build on ``base`` itself.
    """
    backbone = clone(base, share=name not in OWN_COPY) if share else base
    backbone.freeze()
    if name == "floor" or name.startswith("floor+"):
        n = int(name.split("+")[1]) if "+" in name else 0
        return _floor(name, backbone, lengthen(batch, n) if n else batch)
    if name.startswith("peft:"):
        method = name.split(":", 1)[1]
        return _peft(name, method, backbone, batch, budget, registry, (ours or {}).get(method))
    method = registry.method(name)
    cfg, desc = solved_config(method, backbone.spec, budget, batch["input_ids"].shape[1])
    injection = peftbench.apply(method, backbone, cfg)
    trainable = injection.trainable_params
    note, fraction = "", None
    if name == "qlora":
        mem = injection.memory()
        fraction = mem["quantized_bytes"] / mem["fp32_bytes"]
        note = (f"4-bit base weights: {mem['quantized_bytes'] / 2**20:,.1f} MiB for {mem['quantized_params']:,} "
                f"parameters ({mem['bytes_per_param']:.3f} bytes each) = {fraction:.3f}× their fp32 size")
    kind = "baseline" if name in ("full", "head", "topk") else "ours"
    return Contender(name, kind, backbone.model, batch, trainable, desc, note, method=name, injection=injection,
                     virtual_tokens=cfg.n if name in INPUT_PROMPTS else 0, quantized_fraction=fraction)


class _Scale(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), device=device))


def _floor(name: str, backbone: peftbench.Backbone, batch: dict) -> Contender:
    """Frozen backbone; embeddings output times one trainable scalar, so backward reaches layer 0."""
    embeddings = backbone.embeddings()
    embeddings.floor_scale = _Scale(embeddings.weight.device)
    embeddings.register_forward_hook(lambda module, args, out: out * module.floor_scale.scale)
    length = batch["input_ids"].shape[1]
    return Contender(name, "baseline", backbone.model, batch, 1, f"1 scalar, sequence {length}")


# -- peft equivalents --------------------------------------------------------------------------
def _peft(name: str, method: str, backbone: peftbench.Backbone, batch: dict, budget: str, registry,
          twin: Contender | None) -> Contender:
    import peft

    ours = registry.method(method)
    cfg, desc = solved_config(ours, backbone.spec, budget, batch["input_ids"].shape[1])
    task = "SEQ_CLS" if backbone.task == "classification" else "CAUSAL_LM"
    if method == "lora":
        paths = [backbone.layout.sites[t] for t in cfg.targets]  # suffixes under each block
        config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=paths,
                                 task_type=task)
    elif method in ("prefix", "ptuning_v2"):
        b = ours.mlp_width(cfg, backbone.spec) if method == "prefix" else None
        config = peft.PrefixTuningConfig(num_virtual_tokens=cfg.n, prefix_projection=b is not None,
                                         encoder_hidden_size=b, task_type=task)
    elif method == "prompt":
        config = peft.PromptTuningConfig(num_virtual_tokens=cfg.n, task_type=task)
    elif method == "ptuning":
        config = peft.PromptEncoderConfig(num_virtual_tokens=cfg.n, encoder_hidden_size=ours.width(cfg, backbone.spec),
                                          encoder_reparameterization_type=cfg.encoder.upper(), task_type=task)
    else:
        raise KeyError(method)
    model = peft.get_peft_model(backbone.model, config)
    bridged = bridge_cache_argument(model) if method in ("prefix", "ptuning_v2") else ""
    head = {id(p) for n, p in model.named_parameters() if "modules_to_save" in n}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head)
    note = ""
    if twin is not None:
        note = copy_weights(method, twin, model)
    note = "; ".join(x for x in (note, bridged) if x)
    return Contender(name, "peft", model, batch, trainable, desc, note, method=method,
                     virtual_tokens=cfg.n if method in INPUT_PROMPTS else 0)


def _ours_module(twin: Contender, kind: type) -> nn.Module:
    return next(m for m in twin.model.modules() if type(m).__name__ == kind)


@torch.no_grad()
def copy_weights(method: str, twin: Contender, model) -> str:
    """Give the peft model our twin's weights (and head); returns a note, or why it could not."""
    try:
        if method == "lora":
            for site_name in twin.injection.config.targets:
                for site in twin.injection.backbone.sites(site_name):
                    # ours B starts at zero: give it values so equal outputs prove equal maths
                    site.module.lora_B.weight.normal_(0, 0.02)
                    theirs = model.base_model.model.get_submodule(site.path)
                    theirs.lora_A["default"].weight.copy_(site.module.lora_A.weight)
                    theirs.lora_B["default"].weight.copy_(site.module.lora_B.weight)
        else:
            encoder = model.prompt_encoder["default"]
            if method == "prefix":
                table = _ours_module(twin, "PrefixTable")
                if encoder.embedding.weight.shape != table.embedding.shape:
                    # peft sizes its prefix embeddings by kv_dim on GQA models; ours are d wide
                    return (f"not the same parameters, timed with peft's own: peft's prefix MLP embeds the n "
                            f"virtual tokens {encoder.embedding.weight.shape[1]} wide (kv_dim, on a GQA model), "
                            f"ours {table.embedding.shape[1]} wide (the hidden size)")
                encoder.embedding.weight.copy_(table.embedding)
                encoder.transform[0].load_state_dict(table.mlp[0].state_dict())
                encoder.transform[2].load_state_dict(table.mlp[2].state_dict())
            elif method == "ptuning_v2":
                prefix = _ours_module(twin, "PrefixTable").prefix  # (L, 2, kv_heads, n, head_dim)
                n = prefix.shape[3]
                encoder.embedding.weight.copy_(prefix.permute(3, 0, 1, 2, 4).reshape(n, -1))  # (n, L·2·kv_dim)
            elif method == "prompt":
                encoder.embedding.weight.copy_(_ours_module(twin, "SoftPrompt").prompt)
            elif method == "ptuning":
                mine = _ours_module(twin, "PromptEncoder")
                encoder.embedding.weight.copy_(mine.embedding)
                encoder.mlp_head.load_state_dict(mine.mlp.state_dict())
                if "lstm" in mine._modules:
                    encoder.lstm_head.load_state_dict(mine.lstm.state_dict())
        _copy_head(twin, model)
    except (RuntimeError, AttributeError, KeyError, StopIteration) as exc:
        return f"weights not copied ({type(exc).__name__}: {str(exc)[:80]})"
    return compare_outputs(method, twin, model)


def _copy_head(twin: Contender, model) -> None:
    """peft trains a copy of the head (``...classifier.modules_to_save.default.weight``)."""
    ours = twin.injection.backbone.head_parameters()  # {"classifier.weight": ...}
    for name, p in model.named_parameters():
        if "modules_to_save.default." in name:
            plain = name.replace("modules_to_save.default.", "")
            key = next(k for k in ours if plain == k or plain.endswith("." + k))
            p.copy_(ours[key])


@torch.no_grad()
def compare_outputs(method: str, twin: Contender, model) -> str:
    """Max |difference| of the logits of ours and peft's on the benchmark batch (eval mode)."""
    inputs = {k: v for k, v in twin.batch.items() if k != "labels"}
    theirs = dict(inputs)
    if method in ("prefix", "ptuning_v2"):
        # peft shifts real tokens' positions by n (its prefix sits in the cache); ours does not,
        # by design: give ours the shifted positions so that equal logits mean equal maths
        batch, length = inputs["input_ids"].shape
        positions = torch.arange(length).expand(batch, -1)
        theirs["position_ids"] = positions  # peft adds n itself
        inputs["position_ids"] = positions + twin.injection.config.n
    was = twin.model.training, model.training
    twin.model.eval()
    model.eval()
    try:
        a, b = twin.model(**inputs).logits, model(**theirs).logits
    finally:
        twin.model.train(was[0])
        model.train(was[1])
    if a.dim() == 3 and b.shape[1] > a.shape[1]:  # peft keeps a causal LM's virtual-token positions
        b = b[:, -a.shape[1]:]
    if a.shape != b.shape:
        return f"same weights; logits shapes differ {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"same weights: max |Δ logits| = {float((a - b).abs().max()):.1e}"
