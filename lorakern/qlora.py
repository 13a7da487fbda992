"""QLoRA linear: ``y = x W^T + bias + s * (dropout(x) A^T) B^T`` with W stored as NF4.

Data flows as in :mod:`.ops`: ``qlora_linear`` (checks, autocast, backend choice) ->
``lorakern::qlora_fwd`` / ``lorakern::qlora_bwd`` (custom ops with fake impls and registered
autograd) -> one of two bodies:

* "native" / "reference": the NF4 matmul (:mod:`.nf4.ops`) for the base and the LoRA term in
  plain torch: the small-M (decode) path, where reading 4-bit weights is the whole cost. On the
  CPU with float32 tensors and no dropout, "native" does base, LoRA term and bias in one kernel
  call (:func:`.nf4.native.cpu_qlora_forward`);
* "triton": W decoded to x's dtype into a temporary (bandwidth-bound: ~14 us for 4096x4096 bf16
  on an H100), then the fused Triton LoRA kernels of :mod:`.triton` on it, forward and backward:
  the large-M (training) path, where the GEMM dominates and the decode is ~1% of it.

Saved for backward: x, h [M, r], the 0-d seed and the NF4 tensors themselves (4.5 bits per
weight): the dequantized W is never kept, backward decodes it again for ``dX = dY W``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import triton_unavailable_reason, warn_once
from .dropout import apply_dropout, draw_seed
from .nf4 import native
from .nf4.format import NF4Weight
from .nf4.ops import SMALL_M, _check_weight, _weight, matmul_impl, resolve_nf4_backend
from .ops import autocast_to, call_layer_op, check_adapter_args, check_x, eager_autograd, fake_grads
from .reference import lora_backward_reference

QLORA_BACKENDS = ("auto", "reference", "native", "triton")


def resolve_qlora_backend(backend: str, x2d: Tensor, r: int) -> str:
    """"reference", "native" or "triton" for this call. "auto": Triton for CUDA inputs with
    M > SMALL_M when it can serve them, else the NF4 backend choice (native or reference)."""
    if backend not in QLORA_BACKENDS:
        raise ValueError(f"backend must be one of {QLORA_BACKENDS}, got {backend!r}")
    if backend == "triton":
        reason = triton_unavailable_reason(x2d, r)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot serve this call: {reason}")
        return "triton"
    if backend == "auto" and x2d.device.type == "cuda" and x2d.shape[0] > SMALL_M:
        reason = triton_unavailable_reason(x2d, r)
        if reason is None:
            return "triton"
        if not torch.compiler.is_compiling():
            warn_once(f"lorakern: QLoRA at large M without the Triton kernels ({reason})")
    return resolve_nf4_backend(backend, x2d.device)


def _decoded(w: NF4Weight, dtype: torch.dtype) -> Tensor:
    """W [out, in] in ``dtype``: the native dequantize when built for the device, else pure torch."""
    if native.unavailable_reason(w.device) is None:
        return native.dequantize_into(w, torch.empty(tuple(w.shape), dtype=dtype, device=w.device))
    return w.dequantize_reference(dtype)


@torch.library.custom_op("lorakern::qlora_fwd", mutates_args=())
def qlora_fwd(
    x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, blocksize: int, out_features: int, bias: Tensor | None, lora_A: Tensor,
    lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    """``x [M, in]`` -> ``(y [M, out], h [M, r])``, the base ``x W^T`` from the NF4 kernels."""
    return _fwd_body(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias, lora_A,
                     lora_B, scaling, dropout_p, seed, backend)


def _fwd_body(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias, lora_A, lora_B,
              scaling, dropout_p, seed, backend):
    w = _weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, [out_features, x.shape[1]], x.dtype)
    y, h = forward_impl(x, w, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
    return y, h.contiguous()


def forward_impl(x, w: NF4Weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed, backend: str):
    """The body of ``lorakern::qlora_fwd`` on a checked weight: ``(y [M, out], h [M, r])``."""
    if backend == "triton":
        from .triton.lora_fwd import lora_forward_triton

        return lora_forward_triton(x, _decoded(w, x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)
    if backend == "native" and dropout_p == 0.0 and _one_cpu_call(x, w, bias, lora_A, lora_B):
        return native.cpu_qlora_forward(x, w, bias, lora_A, lora_B, scaling)
    y = matmul_impl(x, w, False, backend)  # a new tensor: the LoRA term and bias are added in place
    h = apply_dropout(x, dropout_p, seed) @ lora_A.t()
    y.addmm_(h, lora_B.t(), alpha=scaling)
    if bias is not None:
        y.add_(bias)
    return y, h


def _one_cpu_call(x, w: NF4Weight, *tensors) -> bool:
    """Whether the CPU kernel can do the whole forward (base, LoRA term, bias) in one call: small M
    (the decode path) with float32 contiguous tensors. Elsewhere the LoRA term is two small torch
    matmuls, two transposes and an add after the base, each a dispatch on a 0.1-2 ms decode call;
    in the kernel it measured 0.343 ms against 0.329 ms for the base alone (M = 1, 4096 x 4096)."""
    return (x.device.type == "cpu" and 0 < x.shape[0] <= SMALL_M
            and all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in (x, *tensors)))


@qlora_fwd.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias, lora_A, lora_B,
      scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lorakern::qlora_bwd", mutates_args=())
def qlora_bwd(
    dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
    nested_code: Tensor | None, offset: Tensor | None, blocksize: int, lora_A: Tensor, lora_B: Tensor,
    h: Tensor, scaling: float, dropout_p: float, seed: Tensor | None,
    needs_dx: bool, needs_dlora: bool, needs_dbias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads ``(dx [M, in], dA [r, in], dB [out, r], dbias [out])`` (one not asked for is empty):
    the LoRA terms as in :func:`lorakern.reference.lora_backward_reference`, and ``dY W`` of the
    base through the NF4 kernels' transposed product (or, with "triton", all of it by the fused
    Triton backward on W decoded again: W is never saved)."""
    return _bwd_body(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, h, scaling,
                     dropout_p, seed, needs_dx, needs_dlora, needs_dbias, backend)


def _bwd_body(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, h, scaling,
              dropout_p, seed, needs_dx, needs_dlora, needs_dbias, backend):
    w = _weight(packed, absmax, nested_absmax, nested_code, offset, blocksize, [dy.shape[1], x.shape[1]], dy.dtype)
    if backend == "triton":
        from .triton.lora_bwd import lora_backward_triton

        grads = lora_backward_triton(dy, x, _decoded(w, dy.dtype), lora_A, lora_B, h, scaling, dropout_p, seed,
                                     needs_dx, needs_dlora, needs_dbias)
        return tuple(g.contiguous() for g in grads)
    _, dA, dB, dbias = lora_backward_reference(
        dy, x, None, lora_A, lora_B, h, scaling, dropout_p, seed, False, needs_dlora, needs_dbias
    )
    dx = dy.new_empty(0)
    if needs_dx:
        dx = matmul_impl(dy, w, True, backend)
        dx = dx + apply_dropout((dy @ lora_B) * scaling @ lora_A, dropout_p, seed)
    return dx.contiguous(), dA.contiguous(), dB.contiguous(), dbias.contiguous()


@qlora_bwd.register_fake
def _(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, h, scaling,
      dropout_p, seed, needs_dx, needs_dlora, needs_dbias, backend):
    return fake_grads(dy, x, lora_A, lora_B, needs_dx, needs_dlora, needs_dbias)


_N_INPUTS = 15  # of qlora_fwd


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, nested_absmax, nested_code, offset, blocksize, _, _, lora_A, lora_B,
     scaling, dropout_p, seed, backend) = inputs
    _, h = output
    ctx.save_for_backward(x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, h, seed)
    ctx.blocksize, ctx.scaling, ctx.dropout_p, ctx.backend = blocksize, scaling, dropout_p, backend
    ctx.mark_non_differentiable(h)


def _grads(ctx, dy, bwd):
    x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, h, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_dx, needs_dbias, needs_dlora = needs[0], needs[8], needs[9] or needs[10]
    dx, dA, dB, dbias = bwd(
        dy, x, packed, absmax, nested_absmax, nested_code, offset, ctx.blocksize, lora_A, lora_B, h,
        ctx.scaling, ctx.dropout_p, seed, needs_dx, needs_dlora, needs_dbias, ctx.backend,
    )
    grads = [None] * _N_INPUTS
    grads[0] = dx if needs_dx else None
    grads[8] = dbias if needs_dbias else None
    grads[9] = dA if needs[9] else None
    grads[10] = dB if needs[10] else None
    return tuple(grads)


def _backward(ctx, dy, _dh):
    return _grads(ctx, dy, torch.ops.lorakern.qlora_bwd)


qlora_fwd.register_autograd(_backward, setup_context=_setup_context)
EagerQLoRA = eager_autograd(_fwd_body, _setup_context, lambda ctx, dy, _dh: _grads(ctx, dy, _bwd_body))


def qlora_linear(
    x: Tensor, weight: NF4Weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float = 0.0, training: bool = True, backend: str = "auto",
) -> Tensor:
    """QLoRA linear on ``x [..., in]`` -> ``[..., out]`` with an NF4 base ``weight [out, in]``.

    Computed in x's dtype (the base weight is decoded to it; under ``torch.autocast`` everything is
    cast to the autocast dtype first). ``backend``: "auto", "native", "reference" or "triton" (see
    :func:`resolve_qlora_backend`). Gradients flow to x, bias, lora_A and lora_B;
    the 4-bit weight never gets one.
    """
    check_x(x)
    _check_weight(weight, x.device)
    if len(weight.shape) != 2:
        raise ValueError(f"weight: expected a 2-D [out, in] NF4 weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    device_type = x.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    check_adapter_args(x, out_features, in_features, bias, lora_A, lora_B, scaling, dropout_p, autocasting,
                       dtypes=(torch.float16, torch.bfloat16, torch.float32))
    r = lora_A.shape[0]
    if autocasting:
        x, bias, lora_A, lora_B = autocast_to(torch.get_autocast_dtype(device_type), x, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None
    x2d = x.reshape(-1, in_features)
    chosen = resolve_qlora_backend(backend, x2d, r)
    args = (x2d, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset,
            weight.blocksize, out_features, bias, lora_A, lora_B, float(scaling), p, seed, chosen)
    # Inference runs the forward body on the already checked weight (no rebuild from its tensors).
    y, _ = call_layer_op(torch.ops.lorakern.qlora_fwd, EagerQLoRA, args, (x, bias, lora_A, lora_B),
                         lambda: forward_impl(x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed, chosen))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)
