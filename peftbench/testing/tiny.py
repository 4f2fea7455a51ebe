"""Tiny random backbones of any registered architecture, and fixed batches for them.

``tiny_config(layout)`` builds a 2-layer, 32-wide transformers config of the layout's
``model_type`` from that family's own config class (``AutoConfig.for_model``), so every
registered family (and one a plugin adds) gets a model in milliseconds: 4 attention heads and,
where the family has grouped-query attention, 2 key/value heads; fused projections (GPT-2's
``c_attn``) come as the family builds them.
"""

from __future__ import annotations

import torch

VOCAB = 64
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, POSITIONS = 32, 2, 4, 2, 48, 64
_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                "unk_token_id", "mask_token_id", "decoder_start_token_id")


def tiny_config(layout, **overrides):
    """A tiny random-init config of ``layout.model_type`` (an ``ArchLayout``); ``overrides`` win.

    Sizes: hidden 32, 2 layers, 4 heads (head_dim 8), 2 key/value heads where the family has
    ``num_key_value_heads``, FFN width 48, vocabulary 64, 64 positions; special token ids the
    family puts beyond the vocabulary are moved to 0..2 (batches use ids 3..63); a family without
    a padding id gets 0."""
    from transformers import AutoConfig

    model_type = layout.model_type
    default = AutoConfig.for_model(model_type)
    names = layout.config_names
    wanted = {
        names.get("hidden", "hidden_size"): HIDDEN,
        "num_hidden_layers": LAYERS,
        names.get("heads", "num_attention_heads"): HEADS,
        names.get("intermediate", "intermediate_size"): INTERMEDIATE,
        "vocab_size": VOCAB,
        "max_position_embeddings": POSITIONS,
    }
    if hasattr(default, names.get("kv_heads", "num_key_value_heads")):
        wanted[names.get("kv_heads", "num_key_value_heads")] = KV_HEADS
    if getattr(default, "head_dim", None) is not None:
        wanted["head_dim"] = HIDDEN // HEADS
    if getattr(default, "embedding_size", None) is not None:  # ELECTRA's factorised embeddings
        wanted["embedding_size"] = HIDDEN
    for i, name in enumerate(_SPECIAL_IDS):
        value = getattr(default, name, None)
        if isinstance(value, int) and value >= VOCAB:
            wanted[name] = i % 3
        elif isinstance(value, list) and any(v >= VOCAB for v in value):
            wanted[name] = [v if v < VOCAB else i % 3 for v in value]
    if getattr(default, "pad_token_id", None) is None:  # Qwen's: a classifier batch of more than one needs one
        wanted["pad_token_id"] = 0
    kwargs = {k: v for k, v in {**wanted, **overrides}.items()
              if hasattr(default, k) or k in overrides or k == "pad_token_id"}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_backbone(model_type: str, task: str = "classification", *, registry=None, seed: int = 0,
                  num_labels: int = 2, **overrides):
    """A tiny random backbone of the registered architecture ``model_type``.

    ``registry``: where the layout comes from (default: every installed plugin's)."""
    import peftbench

    registry = registry if registry is not None else peftbench.get_registry()
    if model_type not in registry.architectures:
        raise peftbench.ConfigError(f"no registered architecture {model_type!r}; registered: "
                                    f"{', '.join(sorted(registry.architectures)) or '(none)'}")
    config = tiny_config(registry.architectures[model_type].obj, **overrides)
    return peftbench.from_config(config, task=task, num_labels=num_labels, seed=seed, registry=registry)


def tiny_batch(backbone, batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Fixed ``input_ids`` (3..63) and an attention mask whose row 1 has 2 pads, padded as the runner
    pads this backbone: on the left for decoders, on the right for encoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        cols = slice(0, 2) if backbone.spec.is_decoder else slice(length - 2, length)
        mask[1, cols] = 0
        ids[1, cols] = int(backbone.config.pad_token_id or 0)
    return {"input_ids": ids, "attention_mask": mask}


def labels_for(backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels for ``batch``: the next tokens (pads ignored) for a causal LM, classes 0/1 otherwise."""
    if backbone.task == "causal_lm":
        return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    n = batch["input_ids"].shape[0]
    return torch.arange(1, n + 1) % max(2, int(getattr(backbone.config, "num_labels", 2)))


def real_batch(backbone, texts: tuple[str, ...] = ("a fine film", "dull")) -> dict[str, torch.Tensor]:
    """A short tokenized batch for a real backbone (its tokenizer; decoders padded on the left)."""
    tok = backbone.tokenizer
    tok.padding_side = "left" if backbone.spec.is_decoder else "right"
    return dict(tok(list(texts), return_tensors="pt", padding=True))
