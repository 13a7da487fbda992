"""LoRA backward with the Triton kernels (W frozen: no grad for it is ever computed).

With D the dropout operator (regenerated from the seed) and s the scaling:
    dh    = s dY B            skinny over dY          [M, r]    reads dY once
    dB    = s dY^T h          skinny over dY^T        [N, r]    reads dY again; dbias = its row sums
    dA^T  = D(x)^T dh         skinny over x^T         [K, r]    reads x once
    dx    = dY W + D(dh A)    the base GEMM with r extra K-steps (dY W^T^T), masked in the epilogue

The dx GEMM is 2*M*N*K FLOPs (348 us on an H100 at M=8192, K=N=4096 bf16); the three skinny passes
read dY twice and x once (3 * 64 MiB, ~65 us at 3 TB/s). Computing dB from the dh pass would save
one read of dY but needs a cross-program reduction over M (atomics: non-deterministic).
"""

from __future__ import annotations

import torch

from .launch import lora_matmul, skinny


def lora_backward_triton(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed,
                         needs_dx=True, needs_dlora=True, needs_dbias=True):
    """Returns ``(dx [M, K], dA [r, K], dB [N, r], dbias [N])``; one not asked for is empty."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    dx, dA, dB, dbias = (dy.new_empty(0) for _ in range(4))  # distinct: op outputs may not alias
    # dh = s dY B: "w" is B^T [r, N], a strided view.
    dh = torch.empty(M, r, device=dy.device, dtype=dy.dtype)
    if needs_dx or needs_dlora:
        skinny(dy, lora_B.t(), dh, scale=scaling)
    if needs_dlora or needs_dbias:
        dB32 = torch.empty(N, r, device=dy.device, dtype=torch.float32)
        dbias32 = torch.zeros(N, device=dy.device, dtype=torch.float32) if needs_dbias else None
        # dB = s dY^T h: a = dY^T [N, M], w = h^T [r, M]; the row sums of dY^T are dbias.
        skinny(dy.t(), h.t(), dB32, scale=scaling, rowsum=dbias32)
        if needs_dlora:
            dB = dB32.to(lora_B.dtype)
        if needs_dbias:
            dbias = dbias32.to(dy.dtype)
    if needs_dlora:
        # dA^T = D(x)^T dh: a = x^T [K, M] (element (k, m) is x index m*K + k), w = dh^T [r, M].
        dA = torch.empty(r, K, device=dy.device, dtype=torch.float32)
        skinny(x.t(), dh.t(), dA.t(), dropout_p=dropout_p, seed=seed, idx_strides=(1, K))
        dA = dA.to(lora_A.dtype)
    if needs_dx:
        dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
        lora_matmul(dy, weight.t(), dh, lora_A.t(), None, dx, 1.0, dropout_p=dropout_p, seed=seed)
    return dx, dA, dB, dbias
