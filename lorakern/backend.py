"""Which backend serves a call: an explicit request that cannot be served raises, "auto" falls back
to the reference and says so once per reason."""

from __future__ import annotations

import os
import sys
import warnings

import torch

from .nf4 import native

# x rows up to which a quantized base is read by the fused small-M kernels (decode, serving):
# memory-bound there, ~4.5 bits a weight read instead of 16; above it the GEMM dominates.
SMALL_M = 16

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every kernel computes in
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
    if x.dtype not in FLOAT_DTYPES:
        return f"dtype {x.dtype} is not one of float16, bfloat16, float32"
    if r > TRITON_MAX_RANK:
        return f"rank r={r} is above the kernels' maximum of {TRITON_MAX_RANK}"
    return None


# Frames inside these packages are skipped when a warning names where it came from: the line shown
# under it is the user's call (``model(x)``, ``trainer.train()``), not lorakern's or torch's source.
_INTERNAL = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,)) + (os.path.dirname(__file__) + os.sep,)


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, seen from warn_once's caller, of the first frame outside
    lorakern and torch (Python 3.12's ``skip_file_prefixes``, by hand for 3.10 and 3.11)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=_caller_stacklevel())


DESCRIBE = {"reference": "the pure-torch reference path", "native": "the native kernels (lorakern._C)",
            "triton": "the Triton kernels"}

# Every op family's backends, in one table: what a caller may name besides "auto". "reference"
# (pure torch) serves every call; "native" is lorakern._C (the NF4 kernels, CPU and CUDA; on a
# dense base with several adapters, the CPU kernel adding every row's adapter term);
# "triton" the fused LoRA kernels. Adding a family or a backend is one entry here.
BACKENDS = {
    "LoRA": ("reference", "triton"),
    "several-adapter LoRA": ("reference", "native", "triton"),
    "QLoRA": ("reference", "native", "triton"),
    "NF4": ("reference", "native"),
    "QA-LoRA": ("reference", "native", "triton"),
}




def resolve(what: str, requested: str, device: torch.device, prefer, reasons: dict) -> str:
    """The one backend rule, for every op: which of family ``what``'s backends serves this call.

    ``reasons[name]()`` says why ``name`` cannot serve the call (None: it can); "reference" always
    can. An explicit request runs, or raises naming the reason. "auto" takes the first of
    ``prefer`` that can serve, else "reference"; when it passes one over it says so once per
    message, as "lorakern: <what> uses <the backend> (<why not the preferred one>)" (never for meta
    tensors, which only carry shapes, and never while torch.compile traces)."""
    names = ("auto", *BACKENDS[what])
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


def check_op_backend(what: str, backend: str, device: torch.device, reasons: dict) -> None:
    """An op body's own check of the backend it was handed (a name "auto" already resolved to):
    one of family ``what``'s backends, and able to serve the call."""
    if backend not in BACKENDS[what]:
        raise ValueError(f"backend: expected one of {BACKENDS[what]} (the op runs what it is given), got {backend!r}")
    resolve(what, backend, device, (), reasons)


# -- what each backend needs, per family ------------------------------------------------------

def native_reasons(device: torch.device) -> dict:
    return {"native": lambda: native.unavailable_reason(device)}


def lora_reasons(x: torch.Tensor, r: int, auto: bool = False) -> dict:
    """Dense LoRA: the Triton kernels (``auto``: only on CUDA; interpreted kernels only by name)."""
    def triton():
        reason = triton_unavailable_reason(x, r)
        if reason is None and auto and x.device.type != "cuda":
            reason = f"x is on {x.device.type}"
        return reason

    return {"triton": triton}


def qlora_reasons(x2d: torch.Tensor, r: int, base_dtype: torch.dtype | None) -> dict:
    """QLoRA: the fused Triton kernels compute in one dtype, so a ``base_dtype`` other than x's is
    not theirs; "native" as for the NF4 ops."""
    def triton():
        if base_dtype is not None and base_dtype != x2d.dtype:
            return f"the base computes in {base_dtype} and x is {x2d.dtype} (the kernels take one dtype)"
        return triton_unavailable_reason(x2d, r)

    return {"triton": triton, **native_reasons(x2d.device)}


def resolve_lora(backend: str, x: torch.Tensor, r: int) -> str:
    """"reference" or "triton" (auto: the Triton kernels for CUDA tensors)."""
    return resolve("LoRA", backend, x.device, ("triton",), lora_reasons(x, r, auto=backend == "auto"))


def resolve_multi(backend: str, x2d: torch.Tensor, r: int, native_reason) -> str:
    """Several adapters on a dense base: "reference", "native" or "triton". "auto": the Triton
    kernels for CUDA tensors, else the native adapter terms when ``native_reason()`` (why they
    cannot serve the call, or None) allows."""
    reasons = {**lora_reasons(x2d, r, auto=backend == "auto"), "native": native_reason}
    prefer = ("triton",) if x2d.device.type == "cuda" else ("native",)
    return resolve("several-adapter LoRA", backend, x2d.device, prefer, reasons)


def resolve_qlora(backend: str, x2d: torch.Tensor, r: int, base_dtype: torch.dtype | None = None) -> str:
    """"reference", "native" or "triton". "auto": Triton for CUDA inputs with M > SMALL_M when it
    can serve them (the GEMM dominates there), else the native NF4 kernels when built for the
    device, else the reference."""
    return _resolve_quantized("QLoRA", backend, x2d, r, base_dtype)


def resolve_qalora(backend: str, x2d: torch.Tensor, r: int) -> str:
    """QA-LoRA on an INT4 base: "reference", "native" or "triton", chosen as for QLoRA."""
    return _resolve_quantized("QA-LoRA", backend, x2d, r, None)


def _resolve_quantized(what: str, backend: str, x2d: torch.Tensor, r: int, base_dtype) -> str:
    large_cuda = x2d.device.type == "cuda" and x2d.shape[0] > SMALL_M
    prefer = ("triton", "native") if large_cuda else ("native",)
    return resolve(what, backend, x2d.device, prefer, qlora_reasons(x2d, r, base_dtype))


def resolve_nf4(backend: str, device: torch.device) -> str:
    """"native" (``lorakern._C``, when built for the device) or "reference"."""
    return resolve("NF4", backend, device, ("native",), native_reasons(device))
