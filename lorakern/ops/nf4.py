"""NF4 matmul and dequantize as torch.library ops (``lorakern::nf4_matmul``,
``lorakern::nf4_dequantize``), their checks and fakes, and the public :func:`nf4_matmul` /
:func:`nf4_dequantize`. The bodies are :class:`~.bases.NF4Base`'s (native kernels or the reference).

Backends ("auto" picks "native" when ``lorakern._C`` is built for the device): "native" (C++/CUDA)
or "reference" (pure torch); an explicit request that cannot be served raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import FLOAT_DTYPES, check_op_backend, native_reasons, resolve_nf4
from ..nf4.format import NF4Weight
from .bases import NF4Base
from .common import rows


def check_weight(w: NF4Weight, device: torch.device, name: str = "weight") -> None:
    """``w`` is a valid 2-D :class:`NF4Weight` ``[out, in]`` (its pieces checked against each other)
    on ``device``: what every NF4 op and entry point takes."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"{name}: expected an lorakern.NF4Weight, got {type(w).__name__}")
    w.validate()
    if w.device != device:
        raise ValueError(f"{name}: on {w.device}, but x is on {device}")
    if len(w.shape) != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] NF4 weight, got shape {tuple(w.shape)}")


def _check_op_backend(backend: str, device: torch.device) -> None:
    check_op_backend("NF4", backend, device, native_reasons(device))


@torch.library.custom_op("lorakern::nf4_dequantize", mutates_args=())
def nf4_dequantize_op(
    packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, blocksize: int, shape: list[int], dtype: torch.dtype, backend: str,
) -> Tensor:
    """The NF4 weight decoded to ``dtype``, shape ``shape``."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype}")
    w = NF4Weight._trusted(packed, absmax, shape, dtype, blocksize, nested_absmax, nested_code, offset)
    if not torch.compiler.is_compiling():
        w.validate()  # the ops are public (torch.ops.lorakern.*): never hand unchecked pointers to C++
    _check_op_backend(backend, packed.device)
    return NF4Base(w).dequantize(dtype, backend)


@nf4_dequantize_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, shape, dtype, backend):
    return packed.new_empty(shape, dtype=dtype)


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
    return NF4Base(w).matmul(x, transpose, backend)


@nf4_matmul_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, transpose, backend):
    return x.new_empty(x.shape[0], in_features if transpose else out_features)


def check_matmul_x(x, w: NF4Weight, transpose: bool, dim: int | None = None) -> None:
    """``x [..., in]`` (or ``[..., out]`` with ``transpose``) for the 2-D weight ``w``: a float16,
    bfloat16 or float32 tensor on w's device; ``dim``: the rank it must have (the op takes 2-D)."""
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    check_weight(w, x.device)
    k = w.shape[0] if transpose else w.shape[1]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dim {k} ({'out' if transpose else 'in'}_features), "
                         f"got shape {tuple(x.shape)}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"x: expected a {dim}-D [M, {k}] tensor, got shape {tuple(x.shape)}")


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
    chosen = resolve_nf4(backend, x.device)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        # The op: torch.compile traces it as one node, and autograd through it raises (no formula
        # is registered: the QLoRA layers have their own), the same on every backend.
        y = torch.ops.lorakern.nf4_matmul(rows(x), w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset,
                                          w.blocksize, out_features, in_features, transpose, chosen)
    else:
        # The op's body directly (w and x checked above, the backend resolved): the op's dispatch
        # cost 0.1 ms a call right after a 4096 x 4096 decode (its caches cold), 12% of the
        # 2-thread M = 1 call on a Zen 4 (0.61 ms against 0.49 ms for the kernel alone).
        y = NF4Base(w).matmul(rows(x), transpose, chosen)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
