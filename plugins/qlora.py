"""QLoRA (Dettmers et al., 2023): LoRA on top of a frozen 4-bit NF4 backbone.

Every linear site inside the transformer blocks becomes a frozen ``bitsandbytes``
``Linear4bit`` (NF4, double quantisation by default); LoRA then wraps the targets, so a
target's ``base_layer`` is the 4-bit layer. Embeddings, norms and the task head stay as
they are. The trainable parameters are exactly LoRA's. While injected, the replaced
full-precision layers are kept (moved to CPU when the model sits on an accelerator, so
the accelerator holds only the 4-bit copies) and ``remove()`` puts them back bit for bit.

``export --format peft`` writes peft's LoRA beside a 4-bit base: the NF4 layers saved as they
are, with the ``quantization_config`` (``quantization_config()``) under which transformers
loads them, so peft's LoRA runs on the same 4-bit weights.
"""

from __future__ import annotations

from typing import Literal

import peftbench
import torch
from pydantic import Field

from peftbench_plugins.lora import LoRA, LoRAInjection, add_lora, peft_lora, target_names

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QLoRAInjection(LoRAInjection):
    """LoRA's injection plus the 4-bit layers it created, and their real memory."""

    def __init__(self, backbone, method, cfg):
        super().__init__(backbone, method, cfg)
        self.quantized_layers: list[torch.nn.Module] = []

    def quantized_bytes(self) -> int:
        """Bytes the 4-bit weights occupy: packed data plus quantisation state (absmax, codes)."""
        return sum(peftbench.quant.quantized_bytes(layer) for layer in self.quantized_layers)

    def quantized_params(self) -> int:
        """Logical parameters held in 4-bit."""
        return sum(peftbench.quant.quantized_params(layer) for layer in self.quantized_layers)

    def fp32_bytes(self) -> int:
        """Bytes the same weights take in fp32 (4 per parameter)."""
        return 4 * self.quantized_params()

    def costs(self) -> dict[str, peftbench.Cost]:
        return {"4-bit weights": peftbench.Cost(value=self.quantized_bytes(), unit="bytes")}

    def memory(self) -> dict[str, float]:
        q, n = self.quantized_bytes(), self.quantized_params()
        return {"quantized_params": n, "quantized_bytes": q, "fp32_bytes": 4 * n,
                "bytes_per_param": q / n if n else 0.0}


class QLoRA(LoRA):
    name = "qlora"
    knob = "r"
    inserts = "every block linear frozen in 4-bit NF4 (bitsandbytes) + LoRA on the targets (default q, v)"
    default_lr = 5e-4
    schedule_lr = 5e-3  # (2e-3: 0.460, 5e-3: 0.805, 1e-2: 0.785)

    class Config(LoRA.Config):
        compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
            "auto", description="dtype of the 4-bit matmuls; auto: bfloat16 on CUDA, float32 on CPU")
        double_quant: bool = Field(True, description="also quantise the per-block absmax statistics")

    # knob_range and param_count are LoRA's: L * sum over targets of r * (d_in + d_out);
    # the 4-bit weights are frozen and not counted

    mergeable = False  # merged into 4-bit weights it is requantised: not the trained function, not a plain checkpoint

    def identity_at_init(self, cfg):
        return False  # LoRA adds nothing at init, but the 4-bit base differs from the full-precision one

    def peft_adapter(self, injection):
        # peft's LoRA on the same 4-bit base: the exporter saves the NF4 layers as they are (bitsandbytes'
        # serialization) under this quantization_config, so transformers loads them without requantising
        adapter = peft_lora(injection, injection.lora_layers, quantized_base=True)
        if adapter is None:
            return None
        return adapter._replace(base_quantization=quantization_config(injection))

    def check(self, cfg, spec):
        peftbench.quant.require_bitsandbytes(self.name)
        super().check(cfg, spec)

    def inject(self, backbone, cfg):
        injection = QLoRAInjection(backbone, self, cfg)
        dtype = None
        for site in _linear_sites(backbone):
            original = site.module
            dtype = dtype or original.weight.dtype
            device = original.weight.device
            compute = _compute_dtype(cfg.compute_dtype, device)
            layer = peftbench.quant.quantize_linear(original, compute, cfg.double_quant, method=self.name)
            injection.replace(site.parent, site.attr, layer)
            injection.quantized_layers.append(layer)
            if device.type != "cpu":  # keep the full-precision original off the accelerator
                original.to("cpu")
                injection.on_remove(lambda m=original, d=device: m.to(d))
        add_lora(injection, target_names(self.name, cfg.targets, backbone.spec), self.layer_knobs(cfg, backbone.spec),
                 cfg.alpha, cfg.dropout, dtype=dtype)
        return injection


def quantization_config(injection: QLoRAInjection) -> dict:
    """transformers' ``BitsAndBytesConfig`` (as a dict) of the injection's 4-bit layers. Every other linear
    layer of the model (task head, pooler, LM head) is in ``llm_int8_skip_modules``: it stays as it is."""
    import transformers

    layers = injection.quantized_layers
    weight = layers[0].weight
    four_bit = {id(layer) for layer in layers}
    lora = {id(m) for layer in injection.lora_layers for m in (layer.lora_A, layer.lora_B)}
    skip = sorted(name.replace(".base_layer", "") for name, m in injection.backbone.model.named_modules()
                  if (isinstance(m, torch.nn.Linear) or peftbench.is_conv1d(m)) and id(m) not in four_bit | lora)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=weight.quant_type, bnb_4bit_use_double_quant=weight.compress_statistics,
        bnb_4bit_compute_dtype=layers[0].compute_dtype, bnb_4bit_quant_storage=weight.quant_storage,
        llm_int8_skip_modules=skip)
    return config.to_dict()


def _linear_sites(backbone) -> list[peftbench.Site]:
    """One site per distinct linear module of every block (a fused projection once)."""
    seen, out = set(), []
    for name in peftbench.LINEAR_SITES:
        if name in backbone.spec.site_shapes:
            for site in backbone.sites(name):
                if id(site.module) not in seen:
                    seen.add(id(site.module))
                    out.append(site)
    return out


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return COMPUTE_DTYPES[name]


@peftbench.hookimpl
def register_methods(register):
    register(QLoRA)
