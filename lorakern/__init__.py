"""lorakern: fused LoRA / QLoRA linear layers for PyTorch."""

from . import integrations
from .int4.format import INT4Weight
from .int4.qalora import qalora_linear
from .layers import FusedLoRALinear, lora_scaling
from .nf4.format import NF4Weight
from .ops import lora_linear, multi_lora_linear, nf4_dequantize, nf4_matmul, qlora_linear
from .reference import lora_linear_reference

__version__ = "0.1.0"
__all__ = [
    "FusedLoRALinear", "INT4Weight", "NF4Weight", "integrations", "lora_linear", "lora_linear_reference",
    "lora_scaling", "multi_lora_linear",
    "nf4_dequantize", "nf4_matmul", "qalora_linear", "qlora_linear", "__version__",
]
