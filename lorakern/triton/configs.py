"""Launch configurations: the fixed lists the launchers choose from (and ``lorakern.aot`` compiles
for sm_80 / sm_90), the choice by shape, and a small autotuner over each shape's candidates.

Budgets behind the lists (H100: 227 KiB shared memory per block, 255 registers per thread):
- matmul 128x128x64 bf16, 3 stages: 3 * (128*64 + 64*128) * 2 B = 96 KiB of shared memory; the fp32
  accumulator is 128*128*4 B / 256 threads = 64 registers a thread (one accumulator, also in the
  backward with dropout: the masked rank-R product is its initial value).
- fp32 inputs take half the BLOCK_K: the same tiles then need the same bytes.
- M <= 16 (decode) is bound by reading W: BLOCK_M=16 and narrow BLOCK_N so that 4096 outputs make
  128 programs, close to one per SM.
- skinny: one program holds [BLOCK_M, BLOCK_R<=64] fp32 = 32 registers a thread at 64x64, 4 warps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

SM_COUNT_GUESS = 132  # H100 SXM; only used to size grids where no GPU is queried


@dataclass(frozen=True)
class MatmulConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8


@dataclass(frozen=True)
class SkinnyConfig:
    BLOCK_M: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DyConfig:
    BLOCK_M: int
    BLOCK_N: int  # for 16-bit dY; fp32 halves it, as block_k does for the other kernels
    num_warps: int
    num_stages: int


# Each list: what the launcher may choose for one regime, with the reason for its tiles. Every
# config in them compiles without spills for sm_80 and sm_90 on each supported Triton (the AOT
# report, ``python -m lorakern.aot``, lists registers, spills and shared memory per config).
# BLOCK_K is for 16-bit inputs; fp32 halves it (see block_k).
MATMUL_LARGE = (  # M > 64, 16-bit: the largest tiles whose accumulator and 3 stages fit
    MatmulConfig(128, 128, 64, 8, 3),
    MatmulConfig(64, 64, 64, 4, 4),
)
MATMUL_LARGE_DROPOUT = (  # dx with dropout: the mask's hash temporaries need the third stage's registers
    MatmulConfig(128, 128, 64, 8, 2),
    MatmulConfig(64, 64, 64, 4, 4),
)
MATMUL_FP32 = (  # M > 16, fp32: without TF32 the dot runs on FMA units, both tiles in registers
    MatmulConfig(32, 64, 64, 8, 3),
)
MATMUL_UNALIGNED = (  # K, N or a stride not a multiple of 16: scalar loads, an address per element
    MatmulConfig(64, 64, 32, 4, 2),
    MatmulConfig(32, 64, 32, 8, 2),
)
MATMUL_UNALIGNED_FP32 = (  # both of the above at once: the smallest tile
    MatmulConfig(16, 64, 32, 8, 2),
)
MATMUL_MEDIUM = (  # 16 < M <= 64: one row panel, so narrow column panels for more programs
    MatmulConfig(64, 64, 64, 4, 4),
    MatmulConfig(64, 32, 64, 4, 4),
)
MATMUL_DECODE = (  # M <= 16: bound by reading W, 4096 outputs / BLOCK_N=32 = 128 programs, ~one per SM
    MatmulConfig(16, 32, 128, 4, 4),
    MatmulConfig(16, 64, 64, 4, 4),
)
SKINNY = (  # largest BLOCK_M first (skinny_candidates rotates to about one program per SM)
    SkinnyConfig(64, 64, 8, 3),
    SkinnyConfig(32, 64, 4, 3),
    SkinnyConfig(16, 64, 4, 3),
)
# dy_kernel: a [BLOCK_M, BLOCK_N] dY tile feeds two dots, dh += dY B (rows x rank) and dB's
# dY^T h (columns x rank). Every row panel adds its [N, r] share of dB into L2 with atomics:
# N*r*M/BLOCK_M adds, 1/4 of dY's elements at r=16 and BLOCK_M=64, so panels are as tall as fit.
DY_LARGE = (DyConfig(64, 64, 4, 3),)  # M > 64: 64-row panels, the tallest that fit
DY_MEDIUM = (DyConfig(64, 64, 4, 3), DyConfig(32, 64, 4, 3))  # 16 < M <= 64: one or two row panels
DY_SMALL = (DyConfig(16, 64, 4, 3), DyConfig(16, 32, 4, 3))  # M <= 16: split over columns instead
# DoRA's dm reads a z tile beside each dY tile: on 4 warps 64x64 spilled 220 B (sm_80, 16-bit); on 8
# warps with 3 stages 24 B at r=32 with Triton 3.8 (255 registers); with 2 stages no spill on 3.5,
# 3.6, 3.7.0, 3.7.1, 3.8 and 3.9 (sm_80 / sm_90, every rank and variant of the sweep).
DY_LARGE_DM = (DyConfig(64, 64, 8, 2),)
DY_MEDIUM_DM = (DyConfig(64, 64, 8, 2), DyConfig(32, 64, 4, 3))
DY_FP32 = (DyConfig(32, 32, 8, 2),)  # fp32's FMA dots hold both tiles in registers: 32x16 tiles
DY_FP32_SMALL = (DyConfig(16, 32, 8, 2),)  # fp32, M <= 16: 16x16 tiles on 8 warps

# Several adapters per batch (multi_matmul_kernel, multi_skinny_kernel): a tile's row ids and
# adapter ids stay live beside the accumulator and the run loop, and LoRA's 4-warp configs spill
# there (8-32 B on sm_80 / sm_90; which ones differs from one Triton to the next): the multi
# tiles take 8 warps and at most 3 stages, decode tiles BLOCK_K 64 (16-bit; 128 spilled), skinny
# panels 32 rows at most. fp32 (FMA dots, both operand tiles in registers): 16x32 tiles on 8 warps,
# the one shape of those tried with no spill on each of Triton 3.5, 3.6, 3.7.1 and 3.9 (sm_80 and
# sm_90; 80-124 registers). Each of 16x64 on 4 or 8 warps, 16x32 on 4 warps, 16x16 and 32x32
# spilled 8-32 B on at least one of them, and 16x32 on 8 warps with 2 stages spilled on 3.9 only.
# 16-row tiles (decode, fp32 unaligned) gather each row's adapter instead of looping over runs
# (PER_ROW in multi_matmul_kernel): with the run loop they still spilled 8-24 B on sm_80 with
# Triton 3.8 at 48-64 registers; per row, 0 spills on 3.5.0-3.9.0 (at most 204 registers).
MULTI_MATMUL_UNALIGNED = (MatmulConfig(64, 64, 32, 8, 2), MatmulConfig(32, 64, 32, 8, 2))
MULTI_MATMUL_UNALIGNED_FP32 = (MatmulConfig(16, 32, 32, 8, 3),)
MULTI_MATMUL_MEDIUM = (MatmulConfig(64, 64, 64, 8, 3),)  # 16-bit; 64x32 spilled on 3.5 (4 warps) and 3.7 (8)
MULTI_MATMUL_DECODE = (MatmulConfig(16, 32, 64, 8, 3),)  # every dtype; the 16x64 tile spilled on one Triton or another
MULTI_MAX_STAGES = 3

MAX_BLOCK_R = 64  # rank columns in one skinny program; r > 64 takes several (x read r/64 times for h)


def matmul_candidates(M: int, aligned: bool = True, dtype: torch.dtype = torch.bfloat16,
                      dropout: bool = False) -> tuple[MatmulConfig, ...]:
    if not aligned:
        return MATMUL_UNALIGNED_FP32 if dtype == torch.float32 else MATMUL_UNALIGNED
    if M <= 16:
        return MATMUL_DECODE
    if dtype == torch.float32:
        return MATMUL_FP32
    if M <= 64:
        return MATMUL_MEDIUM
    return MATMUL_LARGE_DROPOUT if dropout else MATMUL_LARGE


def multi_matmul_candidates(M: int, aligned: bool = True, dtype: torch.dtype = torch.bfloat16,
                            dropout: bool = False) -> tuple[MatmulConfig, ...]:
    if not aligned:
        return MULTI_MATMUL_UNALIGNED_FP32 if dtype == torch.float32 else MULTI_MATMUL_UNALIGNED
    if M <= 16:
        return MULTI_MATMUL_DECODE
    if M <= 64 and dtype != torch.float32:
        return MULTI_MATMUL_MEDIUM
    warps = (lambda c: c.num_warps) if dtype == torch.float32 else (lambda c: 8)
    return tuple(replace(c, num_warps=warps(c), num_stages=min(c.num_stages, MULTI_MAX_STAGES))
                 for c in matmul_candidates(M, aligned, dtype, dropout))


def all_matmul_configs() -> tuple[MatmulConfig, ...]:
    """Every distinct matmul config the launcher can choose."""
    return tuple(dict.fromkeys(MATMUL_DECODE + MATMUL_MEDIUM + MATMUL_LARGE + MATMUL_LARGE_DROPOUT + MATMUL_FP32
                               + MATMUL_UNALIGNED + MATMUL_UNALIGNED_FP32))


def block_k(cfg: MatmulConfig | SkinnyConfig, dtype: torch.dtype) -> int:
    """The configs' BLOCK_K is for 16-bit inputs; fp32 halves it so a tile needs the same bytes."""
    return cfg.BLOCK_K // 2 if dtype == torch.float32 else cfg.BLOCK_K


def matmul_block_r(r_pad: int) -> int:
    """Rank chunk of the K-concatenated tail: all of it up to 32, else steps of 32, the widest chunk
    that fits beside every matmul tile above; 32 more rank columns cost one more K-step of 64."""
    return min(r_pad, 32)


def skinny_block_r(r_pad: int, dtype: torch.dtype) -> int:
    """All r columns in one program up to MAX_BLOCK_R = 64 (16-bit) or 32 (fp32, whose FMA dot
    holds both tiles in registers); larger ranks take several programs."""
    return min(r_pad, 32 if dtype == torch.float32 else MAX_BLOCK_R)


def skinny_candidates(M: int, r_pad: int, dtype: torch.dtype) -> tuple[SkinnyConfig, ...]:
    """Largest BLOCK_M that still gives about one program per SM, first; the rest for the tuner."""
    r_blocks = -(-r_pad // skinny_block_r(r_pad, dtype))
    for i, cfg in enumerate(SKINNY):
        if -(-M // cfg.BLOCK_M) * r_blocks >= SM_COUNT_GUESS:
            return SKINNY[i:] + SKINNY[:i]
    return SKINNY[::-1]


def multi_skinny_candidates(M: int, r_pad: int, dtype: torch.dtype) -> tuple[SkinnyConfig, ...]:
    """The skinny configs of at most 32 rows; fp32's 32-row panel on 8 warps: on 4 warps it spilled
    16-112 B on sm_90 with Triton 3.9 (192 registers), on 8 warps 128 at most, no spill."""
    cands = tuple(c for c in skinny_candidates(M, r_pad, dtype) if c.BLOCK_M <= 32)
    if dtype != torch.float32:
        return cands
    return tuple(replace(c, num_warps=8) if c.BLOCK_M == 32 else c for c in cands)


def dy_candidates(M: int, dtype: torch.dtype, dm: bool = False) -> tuple[DyConfig, ...]:
    if dtype == torch.float32:
        return DY_FP32_SMALL if M <= 16 else DY_FP32
    if M <= 16:
        return DY_SMALL
    if M <= 64:
        return DY_MEDIUM_DM if dm else DY_MEDIUM
    return DY_LARGE_DM if dm else DY_LARGE


def all_dy_configs() -> tuple[DyConfig, ...]:
    """Every distinct dy_kernel config the launcher can choose."""
    return tuple(dict.fromkeys(DY_SMALL + DY_MEDIUM + DY_LARGE + DY_MEDIUM_DM + DY_LARGE_DM + DY_FP32 + DY_FP32_SMALL))


def dy_split(programs: int, num_tiles: int, sm_count: int) -> tuple[int, int]:
    """(splits, tiles per split): the column tiles are split over enough programs to fill about
    two waves (a pass bound by reading dY needs most SMs streaming: 3 TB/s over 132 SMs is 23 GB/s
    each); dh's partial sums then meet by atomic adds too, [BLOCK_M, r] once per program."""
    splits = max(1, min(num_tiles, -(-2 * sm_count // max(programs, 1))))
    per = -(-num_tiles // splits)
    return -(-num_tiles // per), per


_tuned: dict = {}


def autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("LORAKERN_AUTOTUNE", "1") != "0"


def choose(key, candidates, launch, device: torch.device):
    """Run ``launch(cfg)`` with the best of ``candidates`` for ``key`` (timed once per key on CUDA;
    the first candidate elsewhere). Every launch writes the full output, so the timing runs are
    harmless."""
    if len(candidates) == 1 or not autotune_enabled(device):
        return launch(candidates[0]), candidates[0]
    best = _tuned.get(key)
    if best is None:
        from triton.testing import do_bench

        timings = [(do_bench(lambda c=c: launch(c), warmup=5, rep=20), i) for i, c in enumerate(candidates)]
        best = candidates[min(timings)[1]]
        _tuned[key] = best
    return launch(best), best


def bucket(M: int) -> int:
    """Autotune key for M: its power-of-two bucket, so each new batch size is not re-tuned."""
    return 1 << max(M - 1, 0).bit_length()
