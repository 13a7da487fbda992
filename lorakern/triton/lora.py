"""The LoRA forward and backward as sequences of Triton launches (the kernels are in :mod:`.kernels`,
their launchers in :mod:`.launch`).

Forward: two launches, x read once by each.

1. ``h = dropout(x) A^T`` [M, r]: skinny kernel, 2*M*K*r FLOPs, reads x (M*K elements) once.
2. ``y = x W^T + (s h) B^T + bias``: the base GEMM with r extra K-steps; 2*M*N*(K + r) FLOPs.

Floor on an H100 (bf16, 790 TFLOP/s, 3 TB/s) for M=8192, K=N=4096, r=16: the GEMM is 275 GFLOP
(348 us); step 1 is bound by reading x, 64 MiB (22 us), so the pass can reach ~1.06x the base
matmul. A single kernel that also computed h in the GEMM's K-loop would redo it for every column
panel: r/BLOCK_N = 12.5% more tensor-core work at r=16, BLOCK_N=128, and 50% at r=64.

Backward (W frozen: no grad for it is ever computed).

With D the dropout operator (regenerated from the seed) and s the scaling:
    dh    = s dY B          \\  one read of dY (dy_kernel; dB and dbias summed over row panels
    dB    = s dY^T h         |  by fp32 atomic adds) or two (skinny over dY, then over dY^T:     [M, r]
    dbias = sum_m dY        /   fixed order, bitwise reproducible)                              [N, r]
    dA^T  = D(x)^T dh         skinny over x^T, reads x once                                    [K, r]
    dx    = dY W + D(dh A)    the base GEMM with r extra K-steps (dY W^T^T), masked in the epilogue

Floor on an H100 at M=8192, K=N=4096, r=16, bf16: the dx GEMM is 275 GFLOP (348 us at 790 TFLOP/s);
a read of dY is 64 MiB (22 us at 3 TB/s), as is the dA pass's read of x. One read of dY saves 22 us
but adds M/64 * N * r = 8.4 M floats into dB in L2 (r/64 of dY's element count; at r=256 four times
that count); which costs less depends on the GPU's L2 atomic rate, so on CUDA the tuner times both
once per shape and keeps the faster (elsewhere, and with LORAKERN_AUTOTUNE=0, one read).
Under ``torch.use_deterministic_algorithms(True)`` it is always two reads: atomic adds make dB,
dbias (and dh, when column tiles are split over programs) differ in their last bits between runs.
"""

from __future__ import annotations

import torch

from . import launch
from .common import padded_rank
from .configs import bucket, choose
from .launch import dy_grads, lora_matmul, skinny


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``x [M, K]`` (any strides) -> ``(y [M, N], h [M, r])`` in x's dtype."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    h = torch.empty(M, r, device=x.device, dtype=x.dtype)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    skinny(x, lora_A, h, dropout_p=dropout_p, seed=seed, idx_strides=(K, 1), role="h")
    lora_matmul(x, weight, h, lora_B, bias, y, scaling, role="y")
    return y, h


ONE_READ, TWO_READS = "one read of dY", "two reads of dY"


def _two_reads(dy, lora_B, h, dh, dB32, dbias32, scaling):
    if dh is not None:  # dh = s dY B: "w" is B^T [r, N], a strided view.
        skinny(dy, lora_B.t(), dh, scale=scaling, role="dh")
    if dB32 is not None or dbias32 is not None:
        # dB = s dY^T h: a = dY^T [N, M], w = h^T [r, M]; the row sums of dY^T are dbias.
        out = dB32 if dB32 is not None else torch.empty(dy.shape[1], h.shape[1], device=dy.device,
                                                        dtype=torch.float32)
        skinny(dy.t(), h.t(), out, scale=scaling, rowsum=dbias32, role="dB,dbias")


def dy_pass(dy, lora_B, h, dh, dB32, dbias32, scaling, deterministic: bool):
    """Fill the fp32 ``dh [M, r]``, ``dB32 [N, r]``, ``dbias32 [N]`` (each optional); returns the
    strategy used. Recording launches (lorakern.aot) records both strategies."""
    args = (dy, lora_B, h, dh, dB32, dbias32, scaling)
    if launch.recording():
        dy_grads(*args, role="dh,dB,dbias")
        _two_reads(*args)
        return None
    if deterministic:
        _two_reads(*args)
        return TWO_READS

    def run(strategy):
        return dy_grads(*args, role="dh,dB,dbias") if strategy == ONE_READ else _two_reads(*args)

    key = ("dy pass", bucket(dy.shape[0]), dy.shape[1], padded_rank(h.shape[1]), dy.dtype,
           dh is not None, dB32 is not None, dbias32 is not None)
    return choose(key, (ONE_READ, TWO_READS), run, dy.device)[1]


def backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed,
                         needs_dx=True, needs_dlora=True, needs_dbias=True, deterministic=None):
    """Returns ``(dx [M, K], dA [r, K], dB [N, r], dbias [N])``; one not asked for is empty.
    ``deterministic``: None follows ``torch.are_deterministic_algorithms_enabled()``."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    dx, dA, dB, dbias = (dy.new_empty(0) for _ in range(4))  # distinct: op outputs may not alias
    f32 = dict(device=dy.device, dtype=torch.float32)
    dh = torch.empty(M, r, **f32) if needs_dx or needs_dlora else None
    dB32 = torch.empty(N, r, **f32) if needs_dlora else None
    dbias32 = torch.empty(N, **f32) if needs_dbias else None
    dy_pass(dy, lora_B, h, dh, dB32, dbias32, scaling, deterministic)
    if dB32 is not None:
        dB = dB32.to(lora_B.dtype)
    if dbias32 is not None:
        dbias = dbias32.to(dy.dtype)
    if needs_dlora:
        # dA^T = D(x)^T dh: a = x^T [K, M] (element (k, m) is x index m*K + k), w = dh^T [r, M].
        dA = torch.empty(r, K, **f32)
        skinny(x.t(), dh.t(), dA.t(), dropout_p=dropout_p, seed=seed, idx_strides=(1, K), role="dA")
        dA = dA.to(lora_A.dtype)
    if needs_dx:
        dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
        lora_matmul(dy, weight.t(), dh, lora_A.t(), None, dx, 1.0, dropout_p=dropout_p, seed=seed, role="dx")
    return dx, dA, dB, dbias
