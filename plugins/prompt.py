"""Prompt tuning (Lester et al. 2021): n trained vectors prepended to the input embeddings.

The soft prompt P (n, d) is the only trained tensor; it is initialised from the embeddings
of n random vocabulary tokens (``init: vocab``) or from a normal with the embedding matrix's
standard deviation (``init: random``).

How the prompt gets in (shared with P-tuning, see ``attach_input_prompt``): a forward
pre-hook on the top model turns ``input_ids`` into ``inputs_embeds`` with the layout's
embedding module, prepends the prompt, and extends ``attention_mask`` with ones,
``token_type_ids`` with zeros, ``position_ids`` (if given) with 0..n-1 while shifting the
real ones by n, and causal-LM ``labels`` with -100 (the loss skips the prompt). A causal
LM's output logits are cut back to the caller's T positions. During cached generation the
prompt is in the KV cache after the first step; later steps only get the mask and positions
extended.

Padding side: decoder classification heads (GPT-2, LLaMA ``ForSequenceClassification``)
pick the last non-pad token from ``input_ids``; given ``inputs_embeds`` they take the last
position, which is right only with LEFT padding. Pad decoders on the left (the runner does).
"""

from __future__ import annotations

import inspect
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import nn

import peftbench


def input_prompt_knob_range(spec: peftbench.BackboneSpec) -> tuple[int, int]:
    """Prompt lengths 1 .. half the context: the other half is left for the input."""
    return 1, max(1, spec.max_positions // 2)


def _prepend(tensor: torch.Tensor, n: int, value) -> torch.Tensor:
    """(B, T) -> (B, n + T), the first n columns filled with ``value``."""
    head = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([head, tensor], dim=1)


def attach_input_prompt(injection: peftbench.Injection, prompt: Callable[[], torch.Tensor], n: int) -> None:
    """Prepend ``prompt()`` (n, d) to every input sequence of the backbone's model."""
    backbone = injection.backbone
    model, embeddings = backbone.model, backbone.embeddings()
    signature = inspect.signature(model.forward)
    causal_lm = backbone.task == "causal_lm"
    where = f"method {injection.method.name!r}"
    caller_length = [0]  # T of the current call when it got the prompt (for the output hook)

    def hook(module, args, kwargs):
        caller_length[0] = 0
        if args:  # positional inputs -> keywords, so every input can be found by name
            kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
            args = ()
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise peftbench.ConfigError(
                f"{where}: input prompts need a 2-D attention_mask, got shape {tuple(mask.shape)}"
            )
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 renamed the argument
        if cache is not None and cache.get_seq_length() > 0:
            # cached generation: the prompt is already in the cache, only the mask and positions grow
            if mask is not None:
                kwargs["attention_mask"] = _prepend(mask, n, 1)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            return args, kwargs
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise peftbench.ConfigError(f"{where}: the model got neither input_ids nor inputs_embeds")
            embeds = embeddings(ids)  # (B, T, d)
        batch, length = embeds.shape[:2]
        if n + length > backbone.spec.max_positions:
            raise peftbench.ConfigError(
                f"{where}: field 'n' = {n} virtual tokens + {length} input tokens exceed the context of "
                f"{backbone.spec.name} ({backbone.spec.max_positions}); shorten the input or choose n <= "
                f"{backbone.spec.max_positions - length}"
            )
        soft = prompt().to(embeds.dtype).expand(batch, -1, -1)  # (B, n, d), a view
        kwargs["inputs_embeds"] = torch.cat([soft, embeds], dim=1)  # (B, n + T, d)
        if mask is not None:
            kwargs["attention_mask"] = _prepend(mask, n, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], n, 0)
        positions = kwargs.get("position_ids")
        if positions is not None:  # prompt at 0..n-1, real tokens shifted by n
            head = torch.arange(n, dtype=positions.dtype, device=positions.device).expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([head, positions + n], dim=1)
        labels = kwargs.get("labels")
        if causal_lm and labels is not None:
            kwargs["labels"] = _prepend(labels, n, -100)
        caller_length[0] = length
        return args, kwargs

    def drop_prompt_logits(module, args, output):
        # causal LM logits line up with the caller's tokens again: (B, n + T, V) -> (B, T, V);
        # with logits_to_keep (generate) fewer positions come back and are kept as they are
        length, caller_length[0] = caller_length[0], 0
        logits = getattr(output, "logits", None)
        if length and logits is not None and logits.shape[1] > length:
            output.logits = logits[:, -length:]
        return output

    injection.add_hook(model, hook, pre=True, with_kwargs=True)
    if causal_lm:
        injection.add_hook(model, drop_prompt_logits)


class SoftPrompt(nn.Module):
    """The trained prompt P: (n, d)."""

    def __init__(self, embeddings: nn.Embedding, n: int, init: str):
        super().__init__()
        weight = embeddings.weight.detach()
        if init == "vocab":
            tokens = torch.randint(0, weight.shape[0], (n,), device=weight.device)
            start = weight[tokens].float().clone()
        else:
            start = torch.randn(n, weight.shape[1], device=weight.device) * weight.float().std()
        self.prompt = nn.Parameter(start)

    def forward(self) -> torch.Tensor:
        return self.prompt


class Prompt(peftbench.Method):
    name = "prompt"
    aliases = ("prompt-tuning", "prompt_tuning")
    knob = "n"
    inserts = "n trained vectors prepended to the input embeddings (soft prompt)"
    default_lr = 3e-2

    class Config(peftbench.MethodConfig):
        n: int = Field(20, ge=1, description="virtual tokens (soft prompt length)")
        init: Literal["vocab", "random"] = Field("vocab", description="start from embeddings of random vocabulary "
                                                  "tokens, or from random vectors")

    def knob_range(self, cfg, spec):
        return input_prompt_knob_range(spec)

    def param_count(self, cfg, spec):
        # n · d
        return cfg.n * spec.embed_dim  # n · d_embed (d_embed = hidden, but ELECTRA-small's is narrower)

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        soft = injection.attach(backbone.base_model, "prompt", SoftPrompt(backbone.embeddings(), cfg.n, cfg.init))
        attach_input_prompt(injection, soft, cfg.n)
        injection.soft_prompt = soft
        return injection

    def peft_adapter(self, injection):
        # peft's prompt tuning prepends its (n, d) prompt_embeddings to the input embeddings, with ones
        # in the attention mask and zeros in token_type_ids: what attach_input_prompt does
        spec = injection.backbone.spec
        config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": injection.config.n, "token_dim": spec.embed_dim,
                  "num_transformer_submodules": 1, "num_attention_heads": spec.heads, "num_layers": spec.layers,
                  "prompt_tuning_init": "RANDOM"}
        return peftbench.PeftAdapter(config, {"prompt_embeddings": injection.soft_prompt.prompt.detach().clone()},
                                     head_prefix="base_model.")


@peftbench.hookimpl
def register_methods(register):
    register(Prompt)
