"""NF4 dequantize and matmul as torch.library ops, with the backend choice.

Backends: "reference" (pure torch, :mod:`.reference`), "native" (``lorakern._C``: the C++ CPU
kernels for CPU tensors, the CUDA kernels for CUDA tensors), "auto" (native when built for the
device, else the reference with a one-time warning). An explicit "native" that cannot be served raises.

Matmul strategy (M rows of x):
    M <= SMALL_M: fused dequant-matmul reading the 4-bit bytes directly (memory-bound: ~4.5 bits
        per weight read instead of 16 or 32);
    M >  SMALL_M: compute-bound, so dequantize row tiles of W into one reused buffer and let
        torch's matmul (cuBLAS / the CPU BLAS) do the FLOPs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import check_op_backend
from ..ops import rows
from . import native
from .format import NF4Weight
from .native import NF4_BACKENDS, native_reasons, resolve_nf4_backend
from .reference import nf4_matmul_reference

SMALL_M = 16
TILE_ELEMENTS = 1 << 22  # 4M weights per dequantized tile: 16 MB in fp32, 8 MB in bf16


def _weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, shape, dtype) -> NF4Weight:
    w = NF4Weight._trusted(packed, absmax, shape, dtype, blocksize, nested_absmax, nested_code, offset)
    if not torch.compiler.is_compiling():
        w.validate()  # the ops are public (torch.ops.lorakern.*): never hand unchecked pointers to C++
    return w


@torch.library.custom_op("lorakern::nf4_dequantize", mutates_args=())
def nf4_dequantize_op(
    packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, blocksize: int, shape: list[int], dtype: torch.dtype, backend: str,
) -> Tensor:
    """The NF4 weight decoded to ``dtype``, shape ``shape``."""
    if dtype not in native.OUT_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype}")
    w = _weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, shape, dtype)
    _check_op_backend(backend, packed.device)
    return decoded(w, dtype, backend)


def decoded(w: NF4Weight, dtype: torch.dtype, backend: str = "native") -> Tensor:
    """W (its shape) in ``dtype``: the native dequantize unless the reference was asked for or the
    extension is not built for the device (both give the same bits)."""
    if backend != "reference" and native.unavailable_reason(w.device) is None:
        return native.dequantize_into(w, torch.empty(tuple(w.shape), dtype=dtype, device=w.device))
    return w.dequantize_reference(dtype)


@nf4_dequantize_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, shape, dtype, backend):
    return packed.new_empty(shape, dtype=dtype)


def _tiled_matmul(x: Tensor, w: NF4Weight, transpose: bool) -> Tensor:
    """Large M: dequantize ``rows_per_tile`` rows of W at a time into one buffer, matmul each tile."""
    rows, cols = w.shape
    rows_per_tile = max(1, min(rows, TILE_ELEMENTS // cols))
    if x.device.type == "cuda":  # the CUDA dequantize writes whole weights: one tile
        full = native.dequantize_into(w, torch.empty(rows, cols, dtype=x.dtype, device=x.device))
        return x @ full if transpose else x @ full.t()
    buf = torch.empty(rows_per_tile * cols, dtype=x.dtype, device=x.device)
    y = x.new_empty(x.shape[0], cols if transpose else rows)
    if transpose:
        y.zero_()
    for r0 in range(0, rows, rows_per_tile):
        n = min(rows_per_tile, rows - r0)
        tile = native.dequantize_into(w, buf[: n * cols], start=r0 * cols).view(n, cols)
        if transpose:  # dx [M, in] += dy[:, r0:r0+n] @ W[r0:r0+n]
            y.addmm_(x[:, r0:r0 + n], tile)
        else:  # y[:, r0:r0+n] = x @ W[r0:r0+n]^T
            y[:, r0:r0 + n] = x @ tile.t()
    return y


@torch.library.custom_op("lorakern::nf4_matmul", mutates_args=())
def nf4_matmul_op(
    x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, blocksize: int, out_features: int, in_features: int, transpose: bool, backend: str,
) -> Tensor:
    """``x [M, in] @ W^T -> [M, out]``, or with ``transpose`` ``x [M, out] @ W -> [M, in]``."""
    w = NF4Weight._trusted(packed, absmax, [out_features, in_features], torch.float32, blocksize, nested_absmax,
                           nested_code, offset)
    check_matmul_x(x, w, transpose, dim=2)  # validates w
    _check_op_backend(backend, x.device)
    return matmul_impl(x, w, transpose, backend)


def check_matmul_x(x, w: NF4Weight, transpose: bool, dim: int | None = None) -> None:
    """``x [..., in]`` (or ``[..., out]`` with ``transpose``) for the 2-D weight ``w``: a float16,
    bfloat16 or float32 tensor on w's device; ``dim``: the rank it must have (the op takes 2-D)."""
    if not isinstance(x, Tensor) or x.dtype not in native.OUT_DTYPES:
        raise TypeError(f"x: expected a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    _check_weight(w, x.device)
    if len(w.shape) != 2:
        raise ValueError(f"weight: expected a 2-D [out, in] NF4 weight, got shape {tuple(w.shape)}")
    k = w.shape[0] if transpose else w.shape[1]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dim {k} ({'out' if transpose else 'in'}_features), "
                         f"got shape {tuple(x.shape)}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"x: expected a {dim}-D [M, {k}] tensor, got shape {tuple(x.shape)}")


def _check_op_backend(backend: str, device: torch.device) -> None:
    check_op_backend(NF4_BACKENDS, backend, device, native_reasons(device))


def matmul_impl(x: Tensor, w: NF4Weight, transpose: bool, backend: str) -> Tensor:
    """The body of ``lorakern::nf4_matmul`` (x 2-D, w checked), callable without the dispatcher."""
    out_features, in_features = w.shape
    if backend != "native":
        return nf4_matmul_reference(x, w, transpose).contiguous()
    M = x.shape[0]
    if M == 0:
        return x.new_empty(0, in_features if transpose else out_features)
    if M <= SMALL_M:
        if x.device.type == "cpu":
            return native.cpu_matmul(x, w, transpose).to(x.dtype)
        if not transpose:
            return native.cuda_gemv(x, w)
    return _tiled_matmul(x.contiguous(), w, transpose)


@nf4_matmul_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, transpose, backend):
    return x.new_empty(x.shape[0], in_features if transpose else out_features)


def _check_weight(w: NF4Weight, device: torch.device, name: str = "weight") -> None:
    if not isinstance(w, NF4Weight):
        raise TypeError(f"{name}: expected an lorakern.NF4Weight, got {type(w).__name__}")
    w.validate()
    if w.device != device:
        raise ValueError(f"{name}: on {w.device}, but x is on {device}")


def _op_args(w: NF4Weight) -> tuple:
    return (w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize)


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """Decode ``w`` to ``dtype`` (default ``w.dtype``): a new tensor of shape ``w.shape``."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"weight: expected an lorakern.NF4Weight, got {type(w).__name__}")
    return w.dequantize(dtype, backend)


def nf4_matmul(x: Tensor, w: NF4Weight, transpose: bool = False, backend: str = "auto") -> Tensor:
    """``x [..., in] @ W^T -> [..., out]`` (or ``x [..., out] @ W -> [..., in]`` with ``transpose``),
    W an NF4 weight ``[out, in]`` decoded to x's dtype. Not differentiable on its own: the QLoRA
    layer's autograd uses it for both directions."""
    check_matmul_x(x, w, transpose)
    out_features, in_features = w.shape
    chosen = resolve_nf4_backend(backend, x.device)
    x2d = rows(x)
    y = torch.ops.lorakern.nf4_matmul(x2d, *_op_args(w), out_features, in_features, transpose, chosen)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
