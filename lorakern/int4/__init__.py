"""Group-wise INT4 base weights (float zero points) and the QA-LoRA op on them."""

from .format import INT4Weight

__all__ = ["INT4Weight"]
