"""peft's prompt-learning tuners as peftbench methods: ``peft:prompt_tuning``, ``peft:p_tuning``,
``peft:prefix_tuning``.

peft applies these by wrapping the whole model: ``PeftModel.forward`` prepends the prompt to the input
embeddings, or hands the prefix to the model as cached keys and values. The bridge takes peft's own
prompt modules instead, built from peft's own config classes (``PromptEmbedding`` for prompt tuning,
``PromptEncoder`` for P-tuning, ``PrefixEncoder`` for prefix tuning: their parameters, initialisation and
forward), and feeds what they produce through peftbench's insertion paths: the input prompt of
``prompt``/``ptuning`` (``attach_input_prompt``) and the key/value prefix of ``prefix``/``ptuning_v2``
(``Injection.kv_prefix``). So each is budget-solved (the knob is ``num_virtual_tokens``; sizes are counted
by building peft's module on the meta device), verified, saved, ablated and removed like every method,
and a test shows each equal to peftbench's own twin at equal weights (and those twins equal peft's
``PeftModel`` in ``tests/test_prompts.py`` and ``tests/test_kv_prefix.py``).

The prefix is laid out as peft lays it out, ``(n, L·2·token_dim)`` viewed as ``(n, L·2, heads, head_dim)``,
layer-major with the key before the value; ``token_dim`` is the keys' width (``kv_heads·head_dim``, the
hidden size without GQA, where this is exactly peft's configuration). peft's other config fields
(``prompt_tuning_init``, ``encoder_hidden_size``, ``encoder_reparameterization_type``, ``prefix_projection``,
...) pass through ``options``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

import peftbench

from .prefix import kv_prefix_knob_range
from .prompt import attach_input_prompt, input_prompt_knob_range

#: peftbench name -> (peft config class name, peft module, what it inserts, default n, default lr)
KINDS = {
    "prompt_tuning": ("PromptTuningConfig", "PromptEmbedding", "peft's prompt tuning: n trained vectors "
                      "prepended to the input embeddings (peft's PromptEmbedding)", 20, 3e-2),
    "p_tuning": ("PromptEncoderConfig", "PromptEncoder", "peft's P-tuning: n input vectors made by peft's "
                 "PromptEncoder (MLP or LSTM) from trained embeddings", 20, 1e-2),
    "prefix_tuning": ("PrefixTuningConfig", "PrefixEncoder", "peft's prefix tuning: per-layer key/value "
                      "prefixes from peft's PrefixEncoder (optionally MLP-projected)", 10, 5e-3),
}
#: fields the bridge sets from the backbone; ``options`` may not set them
OWNED = {"num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
         "task_type", "peft_type", "inference_mode"}


def _peft(name: str):
    import peft

    return getattr(peft, name)


class PeftPromptMethod(peftbench.Method):
    """One peft prompt-learning tuner (an instance per kind, registered as ``peft:<kind>``)."""

    knob = "num_virtual_tokens"
    in_default_grid = False  # run when named

    def __init__(self, kind: str):
        config_name, module_name, inserts, default_n, lr = KINDS[kind]
        self.kind, self.name, self.inserts, self.default_lr = kind, f"peft:{kind}", inserts, lr
        self.config_name, self.module_name = config_name, module_name
        self.prefix = kind == "prefix_tuning"

        class Config(peftbench.MethodConfig):
            num_virtual_tokens: int = Field(default_n, ge=1, description="virtual tokens (peft's num_virtual_tokens)")
            options: dict[str, Any] = Field(default_factory=dict, description=f"further fields of peft's "
                                            f"{config_name}, passed as they are")

        Config.__name__ = "Peft" + "".join(p.capitalize() for p in kind.split("_")) + "Config"
        self.Config = Config
        self._counts: dict[tuple, int] = {}

    def peft_config(self, cfg, spec: peftbench.BackboneSpec):
        """peft's config for ``cfg`` on ``spec``; what peft refuses is a ConfigError naming the method."""
        clash = sorted(OWNED & set(cfg.options))
        if clash:
            raise peftbench.ConfigError(f"method {self.name!r}: field 'options' sets {clash}, which the bridge sets "
                                        "from the backbone (the size is num_virtual_tokens)")
        values: dict[str, Any] = {"num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1,
                                  "num_layers": spec.layers}
        if self.prefix:  # keys and values: kv_heads heads of head_dim
            values.update(token_dim=spec.kv_dim, num_attention_heads=spec.kv_heads,
                          encoder_hidden_size=min(512, spec.hidden))
        else:
            values.update(token_dim=spec.embed_dim, num_attention_heads=spec.heads)
            if self.kind == "p_tuning":
                values["encoder_hidden_size"] = spec.embed_dim
        values.update(cfg.options)
        try:
            return _peft(self.config_name)(**values)
        except Exception as exc:
            raise peftbench.ConfigError(f"method {self.name!r}: peft's {self.config_name} refuses {values}: "
                                        f"{type(exc).__name__}: {exc}") from None

    def build(self, cfg, spec, embeddings: nn.Embedding | None = None) -> nn.Module:
        """peft's module for ``cfg``; without ``embeddings`` (counting) prompt tuning starts at random."""
        config = self.peft_config(cfg, spec)
        try:
            if self.kind == "prompt_tuning":
                if embeddings is None:
                    config.prompt_tuning_init = "RANDOM"
                    embeddings = nn.Embedding(1, spec.embed_dim)
                return _peft(self.module_name)(config, embeddings)
            return _peft(self.module_name)(config)
        except Exception as exc:
            raise peftbench.ConfigError(f"method {self.name!r}: peft cannot build its {self.module_name} for "
                                        f"{spec.name}: {type(exc).__name__}: {exc}") from None

    # -- sizes -------------------------------------------------------------------------------
    def knob_range(self, cfg, spec):
        return kv_prefix_knob_range(spec) if self.prefix else input_prompt_knob_range(spec)

    def param_count(self, cfg, spec):
        # counted by building peft's module on the meta device (no weights allocated)
        key = (cfg.model_dump_json(), spec.name, spec.layers, spec.hidden, spec.kv_dim, spec.embed_dim)
        if key not in self._counts:
            with torch.device("meta"):
                module = self.build(cfg, spec)
            self._counts[key] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return self._counts[key]

    # -- building ----------------------------------------------------------------------------
    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        embeddings = backbone.embeddings()
        module = self.build(cfg, backbone.spec, embeddings).to(embeddings.weight.device)
        n = cfg.num_virtual_tokens
        indices = torch.arange(n, device=embeddings.weight.device)
        if self.prefix:
            source = PrefixSource(module, indices, backbone.spec)
            injection.kv_prefix(source.key_value)  # first: a backbone that refuses prefixes leaves nothing behind
            injection.attach(backbone.base_model, "peft_prefix", module)
            injection.add_hook(backbone.base_model, source.new_forward, pre=True)  # one table per forward
            injection.on_remove(source.clear)
        else:
            injection.attach(backbone.base_model, "peft_prompt", module)
            # peft's forward takes (batch, n) token indices and gives (batch, n, d)
            attach_input_prompt(injection, lambda: module(indices[None])[0], n)
        injection.peft_module = module
        return injection


class PrefixSource:
    """peft's PrefixEncoder output of the current forward, split into each layer's key and value."""

    def __init__(self, encoder: nn.Module, indices: torch.Tensor, spec: peftbench.BackboneSpec):
        self.encoder, self.indices, self.spec = encoder, indices, spec
        self.current: tuple[torch.Tensor, ...] | None = None

    def table(self) -> tuple[torch.Tensor, ...]:
        spec, n = self.spec, len(self.indices)
        flat = self.encoder(self.indices[None])[0]  # (n, L·2·kv_dim)
        # peft: (n, L·2, heads, head_dim), layer-major, key before value -> 2·L views of (kv_heads, n, head_dim)
        return flat.view(n, 2 * spec.layers, spec.kv_heads, spec.head_dim).permute(1, 2, 0, 3).unbind(0)

    def new_forward(self, *_args) -> None:
        """Computed once per base-model forward, outside any layer (gradient checkpointing re-runs layers on
        the very same tensors)."""
        self.current = self.table()

    def key_value(self, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.current is None:  # a layer called outside a base-model forward
            self.current = self.table()
        return self.current[2 * layer], self.current[2 * layer + 1]

    def clear(self) -> None:
        self.current = None


def register(register_method) -> None:
    for kind in KINDS:
        register_method(PeftPromptMethod(kind))
