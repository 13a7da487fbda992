"""Which backend serves a call: an explicit request that cannot be served raises, "auto" falls back
to the reference and says so once per reason."""

from __future__ import annotations

import os
import warnings

import torch

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


DESCRIBE = {"reference": "the pure-torch reference path", "native": "the native kernels (lorakern._C)",
            "triton": "the Triton kernels"}


def resolve(what: str, names: tuple[str, ...], requested: str, device: torch.device, prefer, reasons: dict) -> str:
    """The one backend rule, for every op: which of ``names`` serves this call.

    ``reasons[name]()`` says why ``name`` cannot serve the call (None: it can); "reference" always
    can. An explicit request runs, or raises naming the reason. "auto" takes the first of
    ``prefer`` that can serve, else "reference"; when it passes one over it says so once per
    message, as "lorakern: <what> uses <the backend> (<why not the preferred one>)" (never for meta
    tensors, which only carry shapes, and never while torch.compile traces)."""
    if requested not in names:
        raise ValueError(f"backend must be one of {names}, got {requested!r}")
    if requested != "auto":
        reason = reasons[requested]() if requested in reasons else None
        if reason is not None:
            raise RuntimeError(f"backend={requested!r} cannot serve {device.type} tensors: {reason}")
        return requested
    passed_over, chosen = None, "reference"
    for name in prefer:
        reason = reasons[name]()
        if reason is None:
            chosen = name
            break
        passed_over = passed_over or reason
    if passed_over is not None and device.type != "meta" and not torch.compiler.is_compiling():
        warn_once(f"lorakern: {what} uses {DESCRIBE[chosen]} ({passed_over})")
    return chosen


def check_op_backend(names: tuple[str, ...], backend: str, device: torch.device, reasons: dict) -> None:
    """An op body's own check of the backend it was handed (a name "auto" already resolved to):
    one of ``names`` other than "auto", and able to serve the call."""
    if backend == "auto" or backend not in names:
        raise ValueError(f"backend: expected one of {names[1:]} (the op runs what it is given), got {backend!r}")
    resolve("", names, backend, device, (), reasons)


LORA_BACKENDS = ("auto", "reference", "triton")

def resolve_backend(backend: str, x: torch.Tensor, r: int) -> str:
    """Map a requested backend to the one that runs: "reference" or "triton" (auto: the Triton
    kernels for CUDA tensors; interpreted kernels only when asked for by name)."""
    return resolve("LoRA", LORA_BACKENDS, backend, x.device, ("triton",), {"triton": lambda: _triton(backend, x, r)})


def _triton(backend: str, x: torch.Tensor, r: int) -> str | None:
    reason = triton_unavailable_reason(x, r)
    if reason is None and backend == "auto" and x.device.type != "cuda":
        reason = f"x is on {x.device.type}"  # interpreted kernels only when asked for by name
    return reason
