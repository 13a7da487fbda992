"""Which backend serves a call: an explicit request that cannot be served raises, "auto" falls back
to the reference and says so once per reason."""

from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "reference", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_RANK = 256  # the h / dh tiles hold all r columns in registers: [BLOCK_M, 256] fp32 at most

_warned: set[str] = set()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_unavailable_reason(x: torch.Tensor, r: int) -> str | None:
    """Why the Triton kernels cannot take this input, or None when they can."""
    if not _triton_installed():
        return "triton is not installed (pip install triton)"
    if x.device.type == "cuda":
        if torch.version.hip is None and torch.cuda.get_device_capability(x.device) < (8, 0):
            return "the Triton kernels need a CUDA GPU of compute capability 8.0 or newer"
    elif not interpreting():
        return f"x is on {x.device.type}; the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)"
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} is not one of float16, bfloat16, float32"
    if r > TRITON_MAX_RANK:
        return f"rank r={r} is above the kernels' maximum of {TRITON_MAX_RANK}"
    return None


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def resolve_backend(backend: str, x: torch.Tensor, r: int) -> str:
    """Map a requested backend to the one that runs: "reference" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reason = triton_unavailable_reason(x, r)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot serve this call: {reason}")
        return "triton"
    # auto: the kernels for CUDA tensors; interpreted kernels are only used when asked for by name.
    if reason is None and x.device.type == "cuda":
        return "triton"
    if x.device.type == "meta":  # shapes only (model init on meta): nothing runs, nothing to say
        return "reference"
    if reason is None:
        reason = f"x is on {x.device.type}"
    if not torch.compiler.is_compiling():
        warn_once(f"lorakern: using the pure-torch reference path ({reason})")
    return "reference"
