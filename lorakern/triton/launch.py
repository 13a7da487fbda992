"""Launchers for the two kernels: check the tensors, pick a config, compute the grid, launch."""

from __future__ import annotations

import torch
import triton

from ..dropout import keep_threshold
from .common import dot_options, needs_int64, padded_rank
from .configs import (
    bucket,
    choose,
    matmul_block_k,
    matmul_block_r,
    matmul_candidates,
    skinny_block_r,
    skinny_candidates,
)
from .kernels import lora_matmul_kernel, skinny_kernel


def max_offset(t: torch.Tensor) -> int:
    """Largest element offset a kernel computes for ``t`` (decides int32 vs int64 addressing)."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def _dropout_args(p: float, seed: torch.Tensor | None, device) -> tuple:
    if p > 0.0:
        return seed, keep_threshold(p), 1.0 / (1.0 - p), True
    return torch.zeros((), dtype=torch.int64, device=device), 0, 1.0, False


def lora_matmul(a, w, h, b, bias, out, scaling: float, dropout_p: float = 0.0, seed=None, config=None):
    """``out[M, N] = a[M, K] w[N, K]^T + lora + bias``; lora = ``s * h b^T`` or, with dropout,
    ``dropout(h b^T)`` (the backward's dx). ``h [M, R]``, ``b [N, R]``; any strides."""
    M, K = a.shape
    N, R = w.shape[0], h.shape[1]
    if M == 0 or N == 0:
        return None
    seed, threshold, inv_keep, has_dropout = _dropout_args(dropout_p, seed, a.device)
    r_pad = padded_rank(R)
    use_int64 = needs_int64(*(max_offset(t) + 1 for t in (a, w, h, b, out)), M * N)

    def launch(cfg):
        grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
        lora_matmul_kernel[grid](
            a, w, h, b, bias if bias is not None else out, out, seed,
            M, N, K, R,
            a.stride(0), a.stride(1), w.stride(0), w.stride(1), h.stride(0), h.stride(1),
            b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            scaling, threshold, inv_keep,
            HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, USE_INT64=use_int64,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=matmul_block_k(cfg, a.dtype),
            BLOCK_R=matmul_block_r(r_pad), R_PAD=r_pad, GROUP_M=cfg.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(a.dtype),
        )

    candidates = (config,) if config is not None else matmul_candidates(M)
    key = ("matmul", bucket(M), N, K, r_pad, a.dtype, bias is not None, has_dropout)
    return choose(key, candidates, launch, a.device)[1]


def skinny(a, w, out, scale: float = 1.0, dropout_p: float = 0.0, seed=None, idx_strides=(0, 0),
           rowsum=None, config=None):
    """``out[M, R] = scale * dropout(a[M, K]) @ w[R, K]^T``; optional ``rowsum[M] = sum_k a``.

    ``idx_strides`` maps element (i, j) of ``a`` to its dropout index ``i*s0 + j*s1`` in x."""
    M, K = a.shape
    R = w.shape[0]
    if M == 0:
        return None
    seed, threshold, inv_keep, has_dropout = _dropout_args(dropout_p, seed, a.device)
    r_pad = padded_rank(R)
    block_r = skinny_block_r(r_pad)
    use_int64 = needs_int64(*(max_offset(t) + 1 for t in (a, w, out)))

    def launch(cfg):
        grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(r_pad, block_r))
        skinny_kernel[grid](
            a, w, out, rowsum if rowsum is not None else out, seed,
            M, K, R,
            a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
            idx_strides[0], idx_strides[1],
            scale, threshold, inv_keep,
            HAS_DROPOUT=has_dropout, HAS_ROWSUM=rowsum is not None, USE_INT64=use_int64,
            BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K, BLOCK_R=block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(a.dtype),
        )

    candidates = (config,) if config is not None else skinny_candidates(M, r_pad)
    key = ("skinny", bucket(M), K, r_pad, a.dtype, has_dropout, rowsum is not None)
    return choose(key, candidates, launch, a.device)[1]
