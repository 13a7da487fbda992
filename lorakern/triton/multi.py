"""Several adapters in one batch, as Triton launches (the kernels are the ``multi_*`` and
``segment_*`` ones in :mod:`.kernels`; the math and the pure-torch path are lorakern/ops/multi.py).

Layout, chosen by its cost. Stacked ``A [n, R, K]``, ``B [n, N, R]`` (R = the largest rank; adapter
a's rank r_a masks its loads, so a smaller rank is not computed as R), a per-row adapter index,
and per-adapter [n] tensors of rank, scaling and dropout threshold.

- Forward, M > 16: rows sorted by adapter (one argsort on the device, no host sync); a tile of
  BLOCK_M sorted rows holds runs of few adapters, each run one rank-part dot with its adapter's B
  beside the base GEMM's unchanged K-loop. The alternative, tiles that each hold one adapter
  (LoRAFusion, vLLM's segments), pads every adapter's rows to a multiple of BLOCK_M: with 32
  adapters of ~128 rows at M=4096 that is ~1.5x the base GEMM's tiles; mixed tiles keep the base
  at M/BLOCK_M tiles and add at most one extra rank dot per adapter boundary (2*BLOCK_M*BLOCK_N*r
  FLOPs, r/K = 0.4% of a tile's K-loop at K=4096, r=16).
- Forward, M <= 16 (decode): rows as they come, no sort; every run (often one row) reads its
  adapter's B panel, as Punica's BGMV, and the h kernel its A: 8 rows of 8 adapters read 8
  adapters' A and B (8 * 2 * 16 * 4096 * 2 B = 2 MiB at r=16) beside one read of W (32 MiB).
- Backward: sorted rows. dh = s_a dY B_a per run; dA_a^T = D(x_a)^T dh_a and dB_a = s_a dY_a^T h_a
  by a program per (adapter, K tile) over the adapter's rows only (one read of x and of dY in all;
  an adapter without rows writes zeros); dx = dY W + D_a(dh A_a) as the forward's GEMM.

Floor (H100, bf16) at M=4096, K=N=4096, 32 adapters of r=16: the base GEMM is 137 GFLOP (174 us);
the adapters' weights are 32 * 16 * 8192 * 2 B = 8 MiB (3 us at 3 TB/s) and the rank work is
2 * M * r * (K + N) = 1.1 GFLOP: ~1.02x one adapter's forward, the sort (a few us) aside.
Decode M=8 with 8 adapters: W is 32 MiB (11 us); 8 adapters' A and B are 2 MiB (0.7 us): ~1.06x.
"""

from __future__ import annotations

import torch
import triton

from ..dropout import keep_threshold
from .common import dot_options, needs_int64, padded_rank
from .configs import (
    block_k,
    bucket,
    matmul_block_r,
    multi_matmul_candidates,
    multi_skinny_candidates,
    skinny_block_r,
    skinny_candidates,
)
from .kernels import multi_matmul_kernel, multi_skinny_kernel, segment_skinny_kernel
from .launch import _run, max_offset

SORT_ABOVE = 16  # rows: at or below it (decode) the rows are taken as they come, no sort


class Adapters:
    """The per-adapter [n] tensors the kernels read, from each adapter's rank, scaling and dropout
    probability p: rank (int32), scaling, dropout threshold (int32; 0 keeps everything) and 1 / keep
    probability (fp32); ``dropout``: any adapter has p > 0."""

    def __init__(self, ranks, scalings, dropout_ps, device):
        self.rank = torch.tensor(ranks, dtype=torch.int32, device=device)
        self.scale = torch.tensor(scalings, dtype=torch.float32, device=device)
        self.threshold = torch.tensor([keep_threshold(p) for p in dropout_ps], dtype=torch.int32, device=device)
        self.inv_keep = torch.tensor([1.0 / (1.0 - p) for p in dropout_ps], dtype=torch.float32, device=device)
        self.ones = torch.ones(len(ranks), dtype=torch.float32, device=device)
        self.dropout = any(p > 0.0 for p in dropout_ps)
        self.n = len(ranks)

    def seed_arg(self, seed, dropout: bool):
        """The seed tensor a launch passes: the call's seed with dropout, else any int tensor (unread)."""
        return seed if dropout else self.threshold


def sort_rows(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [M], segment [n + 1])`` int32: rows sorted by adapter (-1 first), and where each
    adapter's rows start in that order (``segment[a + 1]`` is where they end)."""
    if index.device.type == "meta":  # lorakern.aot records launches: shapes only
        return torch.empty_like(index), torch.empty(n + 1, device="meta", dtype=torch.int32)
    order = torch.argsort(index, stable=True).to(torch.int32)
    segment = torch.cumsum(torch.bincount(index.long() + 1, minlength=n + 1), 0).to(torch.int32)
    return order, segment


def _int64(M, *tensors) -> bool:
    return needs_int64(M, *(max_offset(t) + 1 for t in tensors if t is not None))


def multi_skinny(a, w, out, order, index, adapters: Adapters, scale, dropout: bool, seed, w_strides, role=""):
    """``out[m, :R] = scale_a dropout_a(a[m]) w_a^T`` for the rows of each adapter; ``w_strides``:
    (adapter, rank, k) strides of the stacked w."""
    M, K = a.shape
    R = out.shape[1]
    if M == 0:
        return None
    r_pad = padded_rank(R)
    block_r = skinny_block_r(r_pad, a.dtype)
    use_int64 = _int64(M, a, out)
    seed = adapters.seed_arg(seed, dropout)

    def call(cfg):
        grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(r_pad, block_r))
        return grid, dict(
            a_ptr=a, w_ptr=w, out_ptr=out, order_ptr=order if order is not None else index, index_ptr=index,
            seed_ptr=seed, rank_ptr=adapters.rank, scale_ptr=scale, thresh_ptr=adapters.threshold,
            invkeep_ptr=adapters.inv_keep, M=M, K=K, R=R,
            stride_am=a.stride(0), stride_ak=a.stride(1), stride_wa=w_strides[0], stride_wr=w_strides[1],
            stride_wk=w_strides[2], stride_om=out.stride(0), stride_or=out.stride(1),
            HAS_ORDER=order is not None, HAS_DROPOUT=dropout, USE_INT64=use_int64,
            BLOCK_M=cfg.BLOCK_M, BLOCK_K=block_k(cfg, a.dtype), BLOCK_R=block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(a.dtype),
        )

    key = ("multi skinny", bucket(M), K, r_pad, a.dtype, dropout, order is not None)
    return _run(multi_skinny_kernel, key, multi_skinny_candidates(M, r_pad, a.dtype), call, a.device, role)


def multi_matmul(a, w, h, b, bias, out, order, index, adapters: Adapters, scale, dropout: bool, seed, b_strides,
                 role=""):
    """``out[m] = a[m] w^T + scale_a h[m] b_a^T + bias``; with ``dropout`` (dx) the rank part is
    masked per row with its adapter's dropout; ``b_strides``: (adapter, n, rank)."""
    M, K = a.shape
    N, R = w.shape[0], h.shape[1]
    if M == 0 or N == 0:
        return None
    r_pad = padded_rank(R)
    use_int64 = _int64(M * N, a, w, h, out, bias)
    seed = adapters.seed_arg(seed, dropout)

    def call(cfg):
        grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
        return grid, dict(
            a_ptr=a, w_ptr=w, h_ptr=h, b_ptr=b, bias_ptr=bias if bias is not None else out, out_ptr=out,
            order_ptr=order if order is not None else index, index_ptr=index, seed_ptr=seed,
            rank_ptr=adapters.rank, scale_ptr=scale, thresh_ptr=adapters.threshold,
            invkeep_ptr=adapters.inv_keep, M=M, N=N, K=K,
            stride_am=a.stride(0), stride_ak=a.stride(1), stride_wn=w.stride(0), stride_wk=w.stride(1),
            stride_hm=h.stride(0), stride_hr=h.stride(1), stride_ba=b_strides[0], stride_bn=b_strides[1],
            stride_br=b_strides[2], stride_om=out.stride(0), stride_on=out.stride(1),
            stride_bias=bias.stride(0) if bias is not None else 0,
            HAS_BIAS=bias is not None, HAS_DROPOUT=dropout, HAS_ORDER=order is not None, USE_INT64=use_int64,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=block_k(cfg, a.dtype),
            BLOCK_R=matmul_block_r(r_pad), GROUP_M=cfg.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, PER_ROW=cfg.BLOCK_M <= 16,
            **dot_options(a.dtype),
        )

    aligned = all(v % 16 == 0 for v in (K, N, a.stride(0), w.stride(0), w.stride(1), out.stride(0)) if v != 1)
    candidates = multi_matmul_candidates(M, aligned, a.dtype, dropout=dropout)
    key = ("multi matmul", bucket(M), N, K, r_pad, a.dtype, bias is not None, dropout, aligned, order is not None)
    return _run(multi_matmul_kernel, key, candidates, call, a.device, role)


def segment_skinny(a, w, out, order, segment, adapters: Adapters, scale, dropout: bool, seed, out_strides,
                   role=""):
    """``out_a[k, :R] = scale_a sum over a's rows m of dropout_a(a[m, k]) w[m, :]`` for every adapter;
    ``out_strides``: (adapter, k, rank) of the stacked fp32 output."""
    M, K = a.shape
    R = w.shape[1]
    n = adapters.n
    r_pad = padded_rank(R)
    block_r = skinny_block_r(r_pad, a.dtype)
    use_int64 = _int64(M, a, w, out)
    seed = adapters.seed_arg(seed, dropout)

    def call(cfg):
        grid = (n, triton.cdiv(K, cfg.BLOCK_M), triton.cdiv(r_pad, block_r))
        return grid, dict(
            a_ptr=a, w_ptr=w, out_ptr=out, order_ptr=order, segment_ptr=segment, seed_ptr=seed,
            rank_ptr=adapters.rank, scale_ptr=scale, thresh_ptr=adapters.threshold,
            invkeep_ptr=adapters.inv_keep, K=K, R=R,
            stride_am=a.stride(0), stride_ak=a.stride(1), stride_wm=w.stride(0), stride_wr=w.stride(1),
            stride_oa=out_strides[0], stride_ok=out_strides[1], stride_or=out_strides[2],
            HAS_DROPOUT=dropout, USE_INT64=use_int64,
            BLOCK_M=cfg.BLOCK_M, BLOCK_K=block_k(cfg, a.dtype), BLOCK_R=block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(a.dtype),
        )

    key = ("segment skinny", bucket(M), K, r_pad, a.dtype, dropout, n)
    return _run(segment_skinny_kernel, key, skinny_candidates(K, r_pad, a.dtype), call, a.device, role)


def forward(x, weight, bias, lora_A, lora_B, index, adapters: Adapters, seed):
    """``x [M, K]`` (any strides), ``lora_A [n, R, K]``, ``lora_B [n, N, R]``, ``index [M]`` int32 ->
    ``(y [M, N], h [M, R])`` in x's dtype (h's rows of no adapter are unset)."""
    M = x.shape[0]
    N, R = weight.shape[0], lora_A.shape[1]
    order = sort_rows(index, adapters.n)[0] if M > SORT_ABOVE else None
    h = torch.empty(M, R, device=x.device, dtype=x.dtype)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    multi_skinny(x, lora_A, h, order, index, adapters, adapters.ones, adapters.dropout, seed, lora_A.stride(),
                 role="multi h")
    multi_matmul(x, weight, h, lora_B, bias, y, order, index, adapters, adapters.scale, False, seed, lora_B.stride(),
                 role="multi y")
    return y, h


def backward(dy, x, weight, lora_A, lora_B, h, index, adapters: Adapters, seed,
             needs_dx=True, needs_dlora=True, needs_dbias=True):
    """``(dx [M, K], dA [n, R, K], dB [n, N, R], dbias [N])``, None where not asked for; dA and dB
    of adapter a come from its rows only (zeros for an adapter without rows)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[1]
    dx = dA = dB = dbias = None
    order, segment = sort_rows(index, adapters.n)
    f32 = dict(device=dy.device, dtype=torch.float32)
    if needs_dx or needs_dlora:
        dh = torch.empty(M, R, **f32)  # dh = s_a dY B_a: "w" is B_a^T [R, N]
        Bs = lora_B.stride()
        multi_skinny(dy, lora_B, dh, order, index, adapters, adapters.scale, False, seed, (Bs[0], Bs[2], Bs[1]),
                     role="multi dh")
    if needs_dlora:
        dA = torch.empty(adapters.n, R, K, **f32)  # written as dA^T: (adapter, k, rank) strides
        segment_skinny(x, dh, dA, order, segment, adapters, adapters.ones, adapters.dropout, seed,
                       (dA.stride(0), dA.stride(2), dA.stride(1)), role="multi dA")
        dB = torch.empty(adapters.n, N, R, **f32)
        segment_skinny(dy, h, dB, order, segment, adapters, adapters.scale, False, seed, dB.stride(),
                       role="multi dB")
        dA, dB = dA.to(lora_A.dtype), dB.to(lora_B.dtype)
    if needs_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    if needs_dx:
        dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
        As = lora_A.stride()  # "b" is A_a^T [K, R]
        multi_matmul(dy, weight.t(), dh, lora_A, None, dx, order, index, adapters, adapters.ones, adapters.dropout,
                     seed,
                     (As[0], As[2], As[1]), role="multi dx")
    return dx, dA, dB, dbias
