"""QLoRA: ``y = x W^T + bias + s * (dropout(x) A^T) B^T`` with W stored as NF4, as the ops
``lorakern::qlora_fwd`` / ``lorakern::qlora_bwd`` and the entry point :func:`qlora_linear`.

The bodies are the dense family's (:func:`.lora.forward_body`) on an :class:`~.bases.NF4Base`:

* "native" / "reference": the NF4 matmul for the base and the LoRA term in plain torch: the
  small-M (decode) path, where reading 4-bit weights is the whole cost. On the CPU with float32
  tensors and no dropout, "native" does base, LoRA term and bias in one kernel call;
* "triton": W decoded to x's dtype into a temporary (bandwidth-bound: ~14 us for 4096x4096 bf16
  on an H100), then the fused Triton LoRA kernels on it, forward and backward: the large-M
  (training) path, where the GEMM dominates and the decode is ~1% of it.

Saved for backward: x, h [M, r], the 0-d seed and the NF4 tensors themselves (4.5 bits per
weight): the dequantized W is never kept, backward decodes it again for ``dX = dY W``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import FLOAT_DTYPES, check_op_backend, qlora_reasons, resolve_qlora
from ..dropout import draw_seed
from ..nf4.format import NF4Weight
from .bases import NF4Base
from .common import (
    Adapter,
    LayerAutograd,
    autocast_dtype,
    autocast_to,
    call_layer_op,
    check_adapter_args,
    check_backward_args,
    check_seed,
    check_x,
    fake_grads,
    fake_saved,
    rows,
)
from .lora import backward_body, forward_body
from .nf4 import check_weight


@torch.library.custom_op("lorakern::qlora_fwd", mutates_args=())
def qlora_fwd(
    x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, blocksize: int, out_features: int, in_features: int, base_dtype: torch.dtype,
    bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor | None,
    magnitude: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x [M, in]`` -> ``(y [M, out], h [M, r], z, norm)``, the base ``x W^T`` from the NF4 kernels
    (DoRA with ``magnitude``: QDoRA; ``z``, ``norm`` as for :func:`lorakern.ops.lora.lora_fwd`).

    The op is public: it checks x, the adapter and the weight's pieces against each other before
    any kernel sees a pointer (the eager path runs :func:`_fwd_body` on arguments that
    :func:`qlora_linear` has checked)."""
    w = NF4Weight._trusted(packed, absmax, [out_features, in_features], x.dtype, blocksize, nested_absmax,
                           nested_code, offset)
    _check_op_args(x, w, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, base_dtype, magnitude)
    return _fwd_body(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features,
                     base_dtype, bias, lora_A, lora_B, scaling, dropout_p, seed, magnitude, backend)


def _check_op_args(x, w: NF4Weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, base_dtype, magnitude,
                   dy=None, h=None, z=None, norm=None, needs_dlora=True):
    """The qlora ops' own checks, the weight's pieces validated here (once)."""
    check_x(x, dim=2)
    check_weight(w, x.device)
    if dy is not None:
        check_backward_args(dy, x, h, lora_A, lora_B, *w.shape, scaling, dropout_p, dtypes=FLOAT_DTYPES,
                            magnitude=magnitude, z=z, norm=norm, needs_dlora=needs_dlora)
    else:
        check_adapter_args(x, *w.shape, bias, lora_A, lora_B, scaling, dropout_p, False, dtypes=FLOAT_DTYPES,
                           magnitude=magnitude)
    if base_dtype not in FLOAT_DTYPES:
        raise TypeError(f"base_dtype: expected float16, bfloat16 or float32, got {base_dtype}")
    check_op_backend("QLoRA", backend, x.device, qlora_reasons(x, lora_A.shape[0], base_dtype))
    check_seed(seed, dropout_p, x.device)


def _base(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, dtype):
    return NF4Base(NF4Weight._trusted(packed, absmax, [out_features, in_features], dtype, blocksize, nested_absmax,
                                      nested_code, offset))


def _fwd_body(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features,
              base_dtype, bias, lora_A, lora_B, scaling, dropout_p, seed, magnitude, backend):
    base = _base(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, x.dtype)
    y, h, z, norm = forward_body(x, base, bias, Adapter(lora_A, lora_B, scaling, dropout_p, seed, magnitude), backend,
                                 base_dtype)
    return y, h.contiguous(), z.contiguous(), norm.clone()  # the norm may be cached


@qlora_fwd.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, base_dtype, bias,
      lora_A, lora_B, scaling, dropout_p, seed, magnitude, backend):
    return x.new_empty(x.shape[0], out_features), *fake_saved(x, out_features, lora_A.shape[0], magnitude)


@torch.library.custom_op("lorakern::qlora_bwd", mutates_args=())
def qlora_bwd(
    dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
    nested_code: Tensor | None, offset: Tensor | None, blocksize: int, out_features: int, in_features: int,
    base_dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor, h: Tensor, scaling: float, dropout_p: float,
    seed: Tensor | None, magnitude: Tensor | None, z: Tensor, norm: Tensor, needs_dx: bool, needs_dlora: bool,
    needs_dbias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads ``(dx [M, in], dA [r, in], dB [out, r], dbias [out], dmagnitude [out])`` (one not asked
    for, and dmagnitude without DoRA, is empty):
    the LoRA terms as in :func:`lorakern.reference.lora_backward_reference`, and ``dY W`` of the
    base through the NF4 kernels' transposed product (or, with "triton", all of it by the fused
    Triton backward on W decoded again: W is never saved)."""
    w = NF4Weight._trusted(packed, absmax, [out_features, in_features], x.dtype, blocksize, nested_absmax,
                           nested_code, offset)
    _check_op_args(x, w, None, lora_A, lora_B, scaling, dropout_p, seed, backend, base_dtype, magnitude, dy=dy, h=h,
                   z=z, norm=norm, needs_dlora=needs_dlora)
    return _bwd_body(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features,
                     base_dtype, lora_A, lora_B, h, scaling, dropout_p, seed, magnitude, z, norm, needs_dx, needs_dlora,
                     needs_dbias, backend)


def _bwd_body(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features,
              base_dtype, lora_A, lora_B, h, scaling, dropout_p, seed, magnitude, z, norm, needs_dx, needs_dlora,
              needs_dbias, backend):
    base = _base(packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, dy.dtype)
    return backward_body(dy, x, base, Adapter(lora_A, lora_B, scaling, dropout_p, seed, magnitude), h, z, norm,
                         needs_dx, needs_dlora, needs_dbias, backend, base_dtype)


@qlora_bwd.register_fake
def _(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, base_dtype,
      lora_A, lora_B, h, scaling, dropout_p, seed, magnitude, z, norm, needs_dx, needs_dlora, needs_dbias, backend):
    return fake_grads(dy, x, lora_A, lora_B, magnitude, needs_dx, needs_dlora, needs_dbias)


_autograd = LayerAutograd("qlora_fwd", "qlora_bwd")
_autograd.register(qlora_fwd, torch.ops.lorakern.qlora_bwd)
EagerQLoRA = _autograd.eager(_fwd_body, _bwd_body)


def qlora_linear(
    x: Tensor, weight: NF4Weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float = 0.0, training: bool = True, backend: str = "auto", compute_dtype: torch.dtype | None = None,
    magnitude: Tensor | None = None,
) -> Tensor:
    """QLoRA linear on ``x [..., in]`` -> ``[..., out]`` with an NF4 base ``weight [out, in]``.

    Computed in x's dtype (the base weight is decoded to it; under ``torch.autocast`` everything is
    cast to the autocast dtype first); on the CPU the native kernels take bfloat16 / float16 x in
    float32 and round the result once (see :func:`lorakern.ops.bases.cpu_call_takes`).
    ``compute_dtype`` (bitsandbytes' ``Linear4bit`` option, e.g. bfloat16 under fp32 activations):
    the base ``x W^T + bias`` is computed in it and cast back to x's dtype, the LoRA term stays in
    x's dtype, as PEFT on bitsandbytes does; outside autocast only.
    ``backend``: "auto", "native", "reference" or "triton" (see :func:`lorakern.backend.resolve_qlora`).
    ``magnitude [out]``: DoRA on the NF4 base (QDoRA), as in :func:`lorakern.lora_linear`.
    Gradients flow to x, bias, lora_A, lora_B and the magnitude; the 4-bit weight never gets one.
    """
    check_x(x)
    check_weight(weight, x.device)
    out_features, in_features = weight.shape
    cast = autocast_dtype(x.device.type)
    check_adapter_args(x, out_features, in_features, bias, lora_A, lora_B, scaling, dropout_p, cast is not None,
                       dtypes=FLOAT_DTYPES, magnitude=magnitude)
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype: expected None, float16, bfloat16 or float32, got {compute_dtype}")
    if cast is not None:
        x, bias, lora_A, lora_B, magnitude = autocast_to(cast, x, bias, lora_A, lora_B, magnitude)
    base_dtype = x.dtype if cast is not None or compute_dtype is None else compute_dtype
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None
    x2d = rows(x)
    chosen = resolve_qlora(backend, x2d, lora_A.shape[0], base_dtype)
    args = (x2d, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset,
            weight.blocksize, out_features, in_features, base_dtype, bias, lora_A, lora_B, float(scaling), p, seed,
            magnitude, chosen)
    # Inference runs the forward body on the already checked weight (no rebuild from its tensors).
    adapter = Adapter(lora_A, lora_B, float(scaling), p, seed, magnitude)
    y = call_layer_op(torch.ops.lorakern.qlora_fwd, EagerQLoRA, args, (x, bias, lora_A, lora_B, magnitude),
                      lambda: forward_body(x2d, NF4Base(weight), bias, adapter, chosen, base_dtype, keep_z=False))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)
