"""P-tuning (Liu et al. 2021, v1): n virtual tokens at the input, produced by a prompt encoder.

    P = encoder(E)        E: (n, d) trained embeddings, P: (n, d) prepended to the input

``encoder: mlp``:  Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)
``encoder: lstm``: a 2-layer bidirectional LSTM (width h) -> Linear(2h, 2h) -> ReLU -> Linear(2h, d)

(the structure peft's PromptEncoder uses, so weights map one to one). The encoder runs once
per forward on the n tokens and the result is shared by the batch. The prompt enters the
model like prompt tuning's (see ``peftbench_plugins.prompt``: left-pad decoders).

``finalize()`` evaluates the encoder once and keeps only its output P (n, d): the encoder
and E are dropped, so what is saved (and counted by ``stored_count``) is n·d values, and
loading a finalized checkpoint reproduces the outputs exactly.

peft saves its own P-tuning (``P_TUNING``) the same way: ``prompt_embeddings`` is the
encoder's output, which an inference-mode peft model uses as the prompt (it builds no
encoder), prepended like prompt tuning's. ``peft_adapter`` writes exactly that.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

import peftbench

from .prompt import attach_input_prompt, input_prompt_knob_range


class PromptEncoder(nn.Module):
    def __init__(self, n: int, d: int, hidden: int, encoder: str):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n, d))
        if encoder == "lstm":
            self.lstm = nn.LSTM(d, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        else:
            self.mlp = nn.Sequential(
                nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d)
            )

    @property
    def flattened(self) -> bool:
        return "mlp" not in self._modules

    def forward(self) -> torch.Tensor:
        if self.flattened:
            return self.prompt  # (n, d)
        x = self.embedding  # (n, d)
        if "lstm" in self._modules:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)  # (1, n, d) -> (1, n, 2h) -> (n, 2h)
        return self.mlp(x)  # (n, d)

    @torch.no_grad()
    def flatten(self) -> None:
        """Evaluate the encoder once and keep only its output P (n, d) as the trained tensor."""
        if self.flattened:
            return
        prompt = self().contiguous().clone()
        for name in ("lstm", "mlp"):
            if name in self._modules:
                delattr(self, name)
        del self.embedding
        self.prompt = nn.Parameter(prompt)


class PTuningInjection(peftbench.Injection):
    encoder: PromptEncoder

    def finalize(self) -> None:
        self.encoder.flatten()
        super().finalize()


class PTuning(peftbench.Method):
    name = "ptuning"
    aliases = ("p-tuning",)
    knob = "n"
    inserts = "n input virtual tokens produced by a prompt encoder (MLP or LSTM)"
    default_lr = 3e-3

    class Config(peftbench.MethodConfig):
        n: int = Field(20, ge=1, description="virtual tokens")
        encoder: Literal["mlp", "lstm"] = Field("mlp", description="the prompt encoder the virtual tokens go through")
        hidden: int | None = Field(None, ge=1, description="encoder width h; default the hidden size d")

    #: the prompt encoder's width h: at a small budget the solver narrows it (the MLP encoder is
    #: about 2·d·h + h² parameters, 1.95% of MiniLM at h = d) so that the n virtual tokens fit
    secondary = "hidden"

    def secondary_values(self, cfg, spec):
        # every width below the default, largest first (the solver keeps the first that fits)
        return list(range(spec.hidden - 1, 0, -1))

    def width(self, cfg, spec) -> int:
        return cfg.hidden if cfg.hidden is not None else spec.hidden

    def knob_range(self, cfg, spec):
        return input_prompt_knob_range(spec)

    def param_count(self, cfg, spec):
        d, h = spec.embed_dim, self.width(cfg, spec)  # d: the input embeddings' width
        if cfg.encoder == "lstm":
            # LSTM layer 1 (input d), both directions: 2·(4h·d + 4h·h + 8h)
            # LSTM layer 2 (input 2h), both directions: 2·(4h·2h + 4h·h + 8h)
            # head: Linear(2h, 2h) + Linear(2h, d): 4h² + 2h + 2h·d + d
            lstm = 2 * (4 * h * d + 4 * h * h + 8 * h) + 2 * (8 * h * h + 4 * h * h + 8 * h)
            encoder = lstm + 4 * h * h + 2 * h + 2 * h * d + d
        else:
            # Linear(d, h) + Linear(h, h) + Linear(h, d): d·h + h + h² + h + h·d + d
            encoder = 2 * d * h + h * h + 2 * h + d
        return cfg.n * d + encoder  # + n·d embeddings

    def stored_count(self, cfg, spec):
        # after finalize(): the encoder's output P, n · d
        return cfg.n * spec.embed_dim

    def inject(self, backbone, cfg):
        spec = backbone.spec
        injection = PTuningInjection(backbone, self, cfg)
        encoder = PromptEncoder(cfg.n, spec.embed_dim, self.width(cfg, spec), cfg.encoder)
        encoder.to(backbone.embeddings().weight.device)
        injection.encoder = injection.attach(backbone.base_model, "prompt_encoder", encoder)
        attach_input_prompt(injection, encoder, cfg.n)
        return injection

    def peft_adapter(self, injection):
        # peft's P_TUNING checkpoint: the encoder's output P (n, d) as ``prompt_embeddings`` (what peft itself
        # saves), with the encoder's shape for the record; our encoder is peft's PromptEncoder layer for layer
        # (2-layer bidirectional LSTM, no dropout)
        cfg, spec = injection.config, injection.backbone.spec
        with torch.no_grad():
            prompt = injection.encoder().detach().clone()  # (n, d): the kept P once finalized
        config = {"peft_type": "P_TUNING", "num_virtual_tokens": cfg.n, "token_dim": spec.embed_dim,
                  "num_transformer_submodules": 1, "num_attention_heads": spec.heads, "num_layers": spec.layers,
                  "encoder_reparameterization_type": cfg.encoder.upper(), "encoder_hidden_size": self.width(cfg, spec),
                  "encoder_num_layers": 2, "encoder_dropout": 0.0}
        return peftbench.PeftAdapter(config, {"prompt_embeddings": prompt}, head_prefix="base_model.")


@peftbench.hookimpl
def register_methods(register):
    register(PTuning)
