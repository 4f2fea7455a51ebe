"""Public building blocks for methods (``peftbench.blocks``), so a third-party method reuses what the
built-in ones use instead of copying it:

- ``LoRALinear``, ``SlicedLoRALinear``, ``LoRAInjection``, ``add_lora``: a low-rank update beside a
  frozen Linear, Conv1D or 4-bit linear, fused output slices included (``peftbench.blocks.lora_linear``);
- ``target_names``, ``validate_targets``, ``ALL_LINEAR``, ``max_rank``: a ``targets`` field naming
  linear sites, checked against a backbone (``peftbench.blocks.targets``).
"""

from peftbench.blocks.lora_linear import LoRAInjection, LoRALinear, SlicedLoRALinear, add_lora
from peftbench.blocks.targets import ALL_LINEAR, max_rank, target_names, validate_targets

__all__ = ["ALL_LINEAR", "LoRAInjection", "LoRALinear", "SlicedLoRALinear", "add_lora", "max_rank", "target_names",
           "validate_targets"]
