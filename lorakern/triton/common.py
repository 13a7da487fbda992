"""Launch helpers shared by the Triton launchers (rank padding, dot options, int64 addressing);
the kernels and their @triton.jit helpers are all in :mod:`.kernels`."""

from __future__ import annotations

import torch
import triton

from ..backend import interpreting

INT32_MAX = 2**31 - 1
# tl.dot needs every dimension >= 16 on sm_80/sm_90 (mma/wgmma K step for 16-bit inputs), so the
# rank is padded up inside the kernels with masked loads: r=1..16 runs as 16, r=17..32 as 32, ...
MIN_DOT = 16


def padded_rank(r: int) -> int:
    """The rank the kernels compute with: a power of two >= 16 (extra columns are masked to zero)."""
    return max(MIN_DOT, triton.next_power_of_2(r))


def dot_options(dtype: torch.dtype) -> dict:
    """Constexprs for tl.dot: upcast when interpreting (the interpreter's bf16 dot is wrong) and
    TF32 for fp32 inputs when torch allows it."""
    interp = interpreting()
    if dtype == torch.float32 and not interp and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    else:
        precision = "ieee"
    return {"DOT_F32": interp, "PRECISION": precision}


def needs_int64(*numels: int) -> bool:
    """Offsets must be int64 once any addressed extent can pass 2**31 elements."""
    return max(numels, default=0) > INT32_MAX
