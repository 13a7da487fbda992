"""lorakern: fused LoRA / QLoRA linear layers for PyTorch."""

from .layers import FusedLoRALinear, lora_scaling
from .ops import lora_linear
from .reference import lora_linear_reference

__version__ = "0.1.0"
__all__ = ["FusedLoRALinear", "lora_linear", "lora_linear_reference", "lora_scaling", "__version__"]
