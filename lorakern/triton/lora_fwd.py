"""LoRA forward with the Triton kernels: two launches, x read once by each.

1. ``h = dropout(x) A^T`` [M, r]: skinny kernel, 2*M*K*r FLOPs, reads x (M*K elements) once.
2. ``y = x W^T + (s h) B^T + bias``: the base GEMM with r extra K-steps; 2*M*N*(K + r) FLOPs.

Floor on an H100 (bf16, 790 TFLOP/s, 3 TB/s) for M=8192, K=N=4096, r=16: the GEMM is 275 GFLOP
(348 us); step 1 is bound by reading x, 64 MiB (22 us), so the pass can reach ~1.06x the base
matmul. A single kernel that also computed h in the GEMM's K-loop would redo it for every column
panel: r/BLOCK_N = 12.5% more tensor-core work at r=16, BLOCK_N=128, and 50% at r=64.
"""

from __future__ import annotations

import torch

from .launch import lora_matmul, skinny


def lora_forward_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``x [M, K]`` (any strides) -> ``(y [M, N], h [M, r])`` in x's dtype."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    h = torch.empty(M, r, device=x.device, dtype=x.dtype)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    skinny(x, lora_A, h, dropout_p=dropout_p, seed=seed, idx_strides=(K, 1), role="h")
    lora_matmul(x, weight, h, lora_B, bias, y, scaling, role="y")
    return y, h
