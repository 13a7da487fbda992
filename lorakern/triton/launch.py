"""Launchers for the three kernels: pick a config, compute the grid and the kernel's arguments, launch.

Each launcher builds a config's grid and keyword arguments in one place (its ``call(cfg)``); under
:func:`record_launches` they are recorded for every candidate config instead of launched, which is
how ``lorakern.aot`` compiles exactly what the launchers can run.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from ..dropout import keep_threshold
from .common import dot_options, needs_int64, padded_rank
from .configs import (
    SM_COUNT_GUESS,
    block_k,
    bucket,
    choose,
    dy_candidates,
    dy_split,
    matmul_block_r,
    matmul_candidates,
    skinny_block_r,
    skinny_candidates,
)
from .kernels import dy_kernel, lora_matmul_kernel, skinny_kernel

_recording: list | None = None


@contextlib.contextmanager
def record_launches():
    """Record, per launch, ``(role, [(kernel, config, grid, kwargs) for each candidate config])``
    instead of launching (works on "meta" tensors: nothing is allocated or run). ``role`` is what
    the launch computes, as its caller named it."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def max_offset(t: torch.Tensor) -> int:
    """Largest element offset a kernel computes for ``t`` (decides int32 vs int64 addressing)."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def _dropout_args(p: float, seed: torch.Tensor | None, device) -> tuple:
    if p > 0.0:
        return seed, keep_threshold(p), 1.0 / (1.0 - p), True
    return torch.zeros((), dtype=torch.int64, device=device), 0, 1.0, False


def recording() -> bool:
    return _recording is not None


def _run(kernel, key, candidates, call, device, role, before=None):
    """Launch ``kernel`` with the chosen candidate; ``before()`` runs ahead of every launch (the
    autotuner's timing runs too), e.g. to zero what the kernel adds into."""
    if _recording is not None:
        _recording.append((role, [(kernel, cfg, *call(cfg)) for cfg in candidates]))
        return candidates[0]

    def launch(cfg):
        grid, kwargs = call(cfg)
        if before is not None:
            before()
        kernel[grid](**kwargs)

    return choose(key, candidates, launch, device)[1]


def lora_matmul(a, w, h, b, bias, out, scaling: float, dropout_p: float = 0.0, seed=None, config=None, role="",
                a_dropout: int = 0, out_dropout: bool = False, a_scale=None, col_scale=None, z=None,
                add_out: bool = False, rank: bool = True):
    """``out[M, N] = a[M, K] w[N, K]^T + lora + bias``; lora = ``s * h b^T`` or, with dropout,
    ``dropout(h b^T)`` (the backward's dx). ``h [M, R]``, ``b [N, R]``; any strides.
    DoRA's variants (see the kernel): ``a_dropout`` 1 / 2 (a is dropout(x) / x - dropout(x), with
    ``dropout_p`` and ``seed``), ``out_dropout`` (all of it masked at the end), ``a_scale [K]`` and
    ``col_scale [N]`` fp32, ``z [M, N]`` (the product before col_scale), ``add_out``, and
    ``rank=False`` (no rank-R part: the plain GEMM). Returns the config used (None when there was
    nothing to compute)."""
    M, K = a.shape
    N, R = w.shape[0], (h.shape[1] if rank else 0)
    if M == 0 or N == 0:
        return None
    seed, threshold, inv_keep, has_dropout = _dropout_args(dropout_p, seed, a.device)
    masks_a, masks_out = has_dropout and a_dropout != 0, has_dropout and out_dropout
    masks_rank = has_dropout and not masks_a and not masks_out
    r_pad = padded_rank(max(R, 1))
    use_int64 = needs_int64(*(max_offset(t) + 1 for t in (a, w, h, b, out, bias, z) if t is not None), M * N)

    def call(cfg):
        grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
        return grid, dict(
            a_ptr=a, w_ptr=w, h_ptr=h, b_ptr=b, bias_ptr=bias if bias is not None else out, out_ptr=out,
            seed_ptr=seed, ascale_ptr=a_scale if a_scale is not None else out,
            colscale_ptr=col_scale if col_scale is not None else out, z_ptr=z if z is not None else out,
            M=M, N=N, K=K, R=R,
            stride_am=a.stride(0), stride_ak=a.stride(1), stride_wn=w.stride(0), stride_wk=w.stride(1),
            stride_hm=h.stride(0), stride_hr=h.stride(1), stride_bn=b.stride(0), stride_br=b.stride(1),
            stride_om=out.stride(0), stride_on=out.stride(1),
            stride_bias=bias.stride(0) if bias is not None else 0,  # an expanded bias has stride 0
            stride_zm=z.stride(0) if z is not None else 0, stride_zn=z.stride(1) if z is not None else 0,
            scaling=scaling, threshold=threshold, inv_keep=inv_keep,
            HAS_BIAS=bias is not None, HAS_DROPOUT=masks_rank, USE_INT64=use_int64,
            A_DROPOUT=a_dropout if masks_a else 0, OUT_DROPOUT=masks_out, A_SCALE=a_scale is not None,
            COL_SCALE=col_scale is not None, STORE_Z=z is not None, ADD_OUT=add_out,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=block_k(cfg, a.dtype),
            BLOCK_R=matmul_block_r(r_pad), GROUP_M=cfg.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(a.dtype),
        )

    # Triton specializes ints divisible by 16; without that hint loads are scalar (see configs).
    aligned = all(v % 16 == 0 for v in (K, N, a.stride(0), w.stride(0), w.stride(1), out.stride(0)) if v != 1)
    candidates = (config,) if config is not None else matmul_candidates(M, aligned, a.dtype, dropout=has_dropout)
    if add_out:  # the tuner's timing runs would add into out more than once
        candidates = candidates[:1]
    variant = (a_dropout if masks_a else 0, masks_out, a_scale is not None, col_scale is not None, z is not None,
               add_out, rank)
    key = ("matmul", bucket(M), N, K, r_pad, a.dtype, bias is not None, has_dropout, aligned, variant)
    return _run(lora_matmul_kernel, key, candidates, call, a.device, role)


def skinny(a, w, out, scale: float = 1.0, dropout_p: float = 0.0, seed=None, idx_strides=(0, 0),
           rowsum=None, config=None, role=""):
    """``out[M, R] = scale * dropout(a[M, K]) @ w[R, K]^T``; optional ``rowsum[M] = sum_k a``.

    ``idx_strides`` maps element (i, j) of ``a`` to its dropout index ``i*s0 + j*s1`` in x.
    Returns the config used (None when there was nothing to compute)."""
    M, K = a.shape
    R = w.shape[0]
    if M == 0:
        return None
    seed, threshold, inv_keep, has_dropout = _dropout_args(dropout_p, seed, a.device)
    r_pad = padded_rank(R)
    block_r = skinny_block_r(r_pad, a.dtype)
    use_int64 = needs_int64(*(max_offset(t) + 1 for t in (a, w, out)))

    def call(cfg):
        grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(r_pad, block_r))
        return grid, dict(
            a_ptr=a, w_ptr=w, out_ptr=out, rowsum_ptr=rowsum if rowsum is not None else out, seed_ptr=seed,
            M=M, K=K, R=R,
            stride_am=a.stride(0), stride_ak=a.stride(1), stride_wr=w.stride(0), stride_wk=w.stride(1),
            stride_om=out.stride(0), stride_or=out.stride(1), IDX_S0=idx_strides[0], IDX_S1=idx_strides[1],
            scale=scale, threshold=threshold, inv_keep=inv_keep,
            HAS_DROPOUT=has_dropout, HAS_ROWSUM=rowsum is not None, USE_INT64=use_int64,
            BLOCK_M=cfg.BLOCK_M, BLOCK_K=block_k(cfg, a.dtype), BLOCK_R=block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(a.dtype),
        )

    candidates = (config,) if config is not None else skinny_candidates(M, r_pad, a.dtype)
    key = ("skinny", bucket(M), K, r_pad, a.dtype, has_dropout, rowsum is not None)
    return _run(skinny_kernel, key, candidates, call, a.device, role)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT_GUESS


def dy_grads(dy, b, h, dh, db, dbias, scale: float, config=None, role="", z=None, dm=None):
    """From one read of ``dy [M, N]``: ``dh [M, R] = scale * dy b``, ``db [N, R] = scale * dy^T h``,
    ``dbias [N] = sum_m dy``, DoRA's ``dm [N] = sum_m dy * z`` (``z [M, N]``), each fp32 and each
    optional (None). ``b [N, R]``, ``h [M, R]``; any strides. db, dbias, dm (and dh, when the column
    tiles are split) are summed into by atomic adds: they are zeroed here before each launch.
    Returns the config used (None: nothing to compute)."""
    M, N = dy.shape
    R = b.shape[1]
    targets = [t for t in (dh, db, dbias, dm) if t is not None]

    def zero():
        for t in targets:
            t.zero_()

    if M == 0 or N == 0 or not targets:
        zero()
        return None
    r_pad = padded_rank(R)
    block_r = skinny_block_r(r_pad, dy.dtype)
    r_blocks = -(-r_pad // block_r) if (dh is not None or db is not None) else 1
    use_int64 = needs_int64(*(max_offset(t) + 1 for t in (dy, b, h, *targets, *(() if z is None else (z,)))))
    sms = sm_count(dy.device)
    fp32 = dy.dtype == torch.float32

    def call(cfg):
        bn = cfg.BLOCK_N // 2 if fp32 else cfg.BLOCK_N
        splits, per = dy_split(triton.cdiv(M, cfg.BLOCK_M) * r_blocks, triton.cdiv(N, bn), sms)
        grid = (triton.cdiv(M, cfg.BLOCK_M), splits, r_blocks)
        return grid, dict(
            a_ptr=dy, b_ptr=b, h_ptr=h, dh_ptr=dh if dh is not None else targets[0],
            db_ptr=db if db is not None else targets[0], dbias_ptr=dbias if dbias is not None else targets[0],
            z_ptr=z if dm is not None else targets[0], dm_ptr=dm if dm is not None else targets[0],
            M=M, N=N, R=R, TILES_PER_SPLIT=per,
            stride_am=dy.stride(0), stride_an=dy.stride(1), stride_bn=b.stride(0), stride_br=b.stride(1),
            stride_hm=h.stride(0), stride_hr=h.stride(1),
            stride_dhm=dh.stride(0) if dh is not None else 0, stride_dhr=dh.stride(1) if dh is not None else 0,
            stride_dbn=db.stride(0) if db is not None else 0, stride_dbr=db.stride(1) if db is not None else 0,
            stride_zm=z.stride(0) if dm is not None else 0, stride_zn=z.stride(1) if dm is not None else 0,
            scale=scale, HAS_DH=dh is not None, DH_ATOMIC=dh is not None and splits > 1,
            HAS_DB=db is not None, HAS_DBIAS=dbias is not None, HAS_DM=dm is not None, USE_INT64=use_int64,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=bn, BLOCK_R=block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(dy.dtype),
        )

    candidates = (config,) if config is not None else dy_candidates(M, dy.dtype, dm is not None)
    key = ("dy", bucket(M), N, r_pad, dy.dtype, dh is not None, db is not None, dbias is not None, dm is not None)
    return _run(dy_kernel, key, candidates, call, dy.device, role, before=zero)
