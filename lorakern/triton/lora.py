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


def _two_reads(dy, lora_B, h, dh, dB32, dbias32, scaling, z=None, dm32=None):
    if dh is not None:  # dh = s dY B: "w" is B^T [r, N], a strided view.
        skinny(dy, lora_B.t(), dh, scale=scaling, role="dh")
    if dB32 is not None or dbias32 is not None:
        # dB = s dY^T h: a = dY^T [N, M], w = h^T [r, M]; the row sums of dY^T are dbias.
        out = dB32 if dB32 is not None else torch.empty(dy.shape[1], h.shape[1], device=dy.device,
                                                        dtype=torch.float32)
        skinny(dy.t(), h.t(), out, scale=scaling, rowsum=dbias32, role="dB,dbias")
    if dm32 is not None and not launch.recording():
        # DoRA's sum_m dY * z in a fixed order: torch's reduction (one [M, N] product in dY's dtype).
        torch.sum(dy * z, 0, dtype=torch.float32, out=dm32)


def dy_pass(dy, lora_B, h, dh, dB32, dbias32, scaling, deterministic: bool, z=None, dm32=None):
    """Fill the fp32 ``dh [M, r]``, ``dB32 [N, r]``, ``dbias32 [N]`` and DoRA's ``dm32 [N]`` (sum_m
    dY * z; each optional); returns the strategy used. Recording launches (lorakern.aot) records
    both strategies."""
    args = (dy, lora_B, h, dh, dB32, dbias32, scaling)
    if launch.recording():
        dy_grads(*args, role="dh,dB,dbias", z=z, dm=dm32)
        _two_reads(*args, z, dm32)
        return None
    if deterministic:
        _two_reads(*args, z, dm32)
        return TWO_READS

    def run(strategy):
        if strategy == ONE_READ:
            return dy_grads(*args, role="dh,dB,dbias", z=z, dm=dm32)
        return _two_reads(*args, z, dm32)

    key = ("dy pass", bucket(dy.shape[0]), dy.shape[1], padded_rank(h.shape[1]), dy.dtype,
           dh is not None, dB32 is not None, dbias32 is not None, dm32 is not None)
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


# -- DoRA (see lorakern/ops/dora.py for the math; g = m / n [N] fp32, computed by the caller) ------
#
# Forward: h as LoRA's; without dropout one launch, ``z = x W^T + s h B^T`` in the accumulator,
# stored, and ``y = g * z + bias`` in the epilogue: beyond LoRA, z's write (M*N elements) and the
# norm's ``W A^T`` (a skinny pass over W: N*K elements read, 2*N*K*r FLOPs). With dropout, PEFT's
# ``y = x W^T + bias - x~ W^T + g z`` is two GEMMs: ``(x - x~) W^T + bias``, then ``z = x~ W^T +
# s h B^T`` added as ``g z``, the mask regenerated in each K-loop.
# Backward: dh, dB, dbias and ``dm = sum_m dY z / n`` from the same read of dY (z read beside it);
# dh uses ``g * B`` and dB is scaled by g after (both [N, r]); dx is LoRA's GEMM on ``g * dY``
# (a per-K scale of its input), or with dropout ``D((g - 1) dY W + dh A)`` then ``+ dY W``.
# Floor at M=8192, K=N=4096, r=16, bf16 on an H100: z's write and read are 64 MiB each (2 x 22 us)
# beside LoRA's fwd+bwd of ~750 us (two 275 GFLOP GEMMs at 790 TFLOP/s plus the passes over x and
# dY), and W A^T 32 MiB (11 us): 1.07x LoRA without dropout; with dropout each direction is two
# GEMMs, as in PEFT (~2x).


def weight_a(weight, lora_A):
    """``W A^T`` [N, r] fp32 (DoRA's norm): the skinny kernel over W."""
    out = torch.empty(weight.shape[0], lora_A.shape[0], device=weight.device, dtype=torch.float32)
    skinny(weight, lora_A, out, role="WA")
    return out


def dora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, g, keep_z: bool):
    """``x [M, K]`` -> ``(y [M, N], h [M, r], z [M, N] or None)``; ``g [N]`` fp32."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    h = torch.empty(M, r, device=x.device, dtype=x.dtype)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    z = torch.empty(M, N, device=x.device, dtype=x.dtype) if keep_z else None
    skinny(x, lora_A, h, dropout_p=dropout_p, seed=seed, idx_strides=(K, 1), role="h")
    if dropout_p == 0.0:
        lora_matmul(x, weight, h, lora_B, bias, y, scaling, col_scale=g, z=z, role="y")
    else:
        lora_matmul(x, weight, h, lora_B, bias, y, scaling, dropout_p, seed, a_dropout=2, rank=False, role="y base")
        lora_matmul(x, weight, h, lora_B, None, y, scaling, dropout_p, seed, a_dropout=1, col_scale=g, z=z,
                    add_out=True, role="y")
    return y, h, z


def dora_backward(dy, x, weight, lora_A, lora_B, h, z, norm, g, scaling, dropout_p, seed,
                  needs_dx=True, needs_dlora=True, needs_dbias=True, deterministic=None):
    """Returns ``(dx [M, K], dA [r, K], dB [N, r], dbias [N], dm [N] fp32)``; one not asked for is empty."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    dx, dA, dB, dbias, dm = (dy.new_empty(0) for _ in range(5))
    f32 = dict(device=dy.device, dtype=torch.float32)
    dh = torch.empty(M, r, **f32) if needs_dx or needs_dlora else None
    dB32 = torch.empty(N, r, **f32) if needs_dlora else None
    dbias32 = torch.empty(N, **f32) if needs_dbias else None
    dm32 = torch.empty(N, **f32) if needs_dlora else None
    gB = (lora_B * g[:, None]).to(lora_B.dtype)  # dh = s (g dY) B = s dY (g B)
    dy_pass(dy, gB, h, dh, dB32, dbias32, scaling, deterministic, z, dm32)
    if dB32 is not None:
        dB = (dB32 * g[:, None]).to(lora_B.dtype)
        dA = torch.empty(r, K, **f32)
        skinny(x.t(), dh.t(), dA.t(), dropout_p=dropout_p, seed=seed, idx_strides=(1, K), role="dA")
        dA = dA.to(lora_A.dtype)
        dm = dm32.div_(norm)
    if dbias32 is not None:
        dbias = dbias32.to(dy.dtype)
    if needs_dx:
        dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
        if dropout_p == 0.0:
            lora_matmul(dy, weight.t(), dh, lora_A.t(), None, dx, 1.0, a_scale=g, role="dx")
        else:
            lora_matmul(dy, weight.t(), dh, lora_A.t(), None, dx, 1.0, dropout_p, seed, out_dropout=True,
                        a_scale=g - 1.0, role="dx")
            lora_matmul(dy, weight.t(), dh, lora_A.t(), None, dx, 1.0, add_out=True, rank=False, role="dx base")
    return dx, dA, dB, dbias, dm
