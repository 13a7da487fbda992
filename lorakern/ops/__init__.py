"""The ops: one module per op family, each holding its torch.library schema, fake, autograd,
argument checks and public entry point.

    common   what every family shares: checks, autocast, the adapter's arguments, the autograd
             written once by argument name, eager body vs op (the only module the families share)
    bases    the base weights (dense, NF4) behind one interface the LoRA bodies are written against
    lora     dense LoRA: lorakern::lora_fwd / lora_bwd, lora_linear, and the LoRA bodies
    qlora    LoRA on an NF4 base: lorakern::qlora_fwd / qlora_bwd, qlora_linear
    dora     DoRA, the magnitude variant of the LoRA bodies: its weight norm, caches, bodies
    multi    several adapters in one call, one per row (mixed batches): multi_lora_linear
    nf4      lorakern::nf4_matmul / nf4_dequantize, nf4_matmul, nf4_dequantize

The backend bodies stay beside what they compute: the pure-torch references in
:mod:`lorakern.reference` and :mod:`lorakern.nf4.reference`, the Triton kernels and their launch
sequences in :mod:`lorakern.triton`, the native NF4 kernels behind :mod:`lorakern.nf4.native`.
Which body serves a call is :mod:`lorakern.backend`'s one rule.

Why this layout: a family is read top to bottom in one file, as flash-attention keeps reference,
launcher, Function and module of an op together, and kernels stay apart from the ops that call
them, as Liger-Kernel's ``ops/`` sits under its ``transformers/`` modules. bitsandbytes' split (every
schema in one ``_ops.py``, kernels registered per device in ``backends/<device>/ops.py``) suits a
library whose ops each have one body per device; here a body differs by backend and by base
weight rather than by device, so the dispatch is the backend rule and the base-weight interface,
not torch.library's device keys.
"""

from .lora import lora_linear
from .multi import multi_lora_linear
from .nf4 import nf4_dequantize, nf4_matmul
from .qlora import qlora_linear

__all__ = ["lora_linear", "multi_lora_linear", "nf4_dequantize", "nf4_matmul", "qlora_linear"]
