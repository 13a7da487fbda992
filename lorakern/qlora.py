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
import torch.nn.functional as F
from torch import Tensor

from .backend import check_op_backend, resolve, triton_unavailable_reason
from .dropout import apply_dropout, draw_seed
from .nf4 import native
from .nf4.format import FLOAT_DTYPES, NF4Weight
from .nf4.native import native_reasons
from .nf4.ops import SMALL_M, _check_weight, decoded, matmul_impl
from .ops import (
    autocast_dtype,
    autocast_to,
    call_layer_op,
    check_adapter_args,
    check_backward_args,
    check_seed,
    check_x,
    eager_autograd,
    fake_grads,
    rows,
)
from .reference import lora_backward_reference

QLORA_BACKENDS = ("auto", "reference", "native", "triton")


def resolve_qlora_backend(backend: str, x2d: Tensor, r: int, base_dtype: torch.dtype | None = None) -> str:
    """"reference", "native" or "triton" for this call, by :func:`.backend.resolve`. "auto": Triton
    for CUDA inputs with M > SMALL_M when it can serve them, else the native NF4 kernels when built
    for the device, else the reference. The fused Triton kernels compute in one dtype: a
    ``base_dtype`` other than x's is not theirs."""
    large_cuda = x2d.device.type == "cuda" and x2d.shape[0] > SMALL_M
    prefer = ("triton", "native") if large_cuda else ("native",)
    return resolve("QLoRA", QLORA_BACKENDS, backend, x2d.device, prefer, qlora_reasons(x2d, r, base_dtype))


def qlora_reasons(x2d: Tensor, r: int, base_dtype: torch.dtype | None) -> dict:
    def triton():
        if base_dtype is not None and base_dtype != x2d.dtype:
            return f"the base computes in {base_dtype} and x is {x2d.dtype} (the kernels take one dtype)"
        return triton_unavailable_reason(x2d, r)

    return {"triton": triton, **native_reasons(x2d.device)}


@torch.library.custom_op("lorakern::qlora_fwd", mutates_args=())
def qlora_fwd(
    x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None,
    offset: Tensor | None, blocksize: int, out_features: int, in_features: int, base_dtype: torch.dtype,
    bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``x [M, in]`` -> ``(y [M, out], h [M, r])``, the base ``x W^T`` from the NF4 kernels.

    The op is public: it checks x, the adapter and the weight's pieces against each other before
    any kernel sees a pointer (the eager path runs :func:`_fwd_body` on arguments that
    :func:`qlora_linear` has checked)."""
    w = NF4Weight._trusted(packed, absmax, [out_features, in_features], x.dtype, blocksize, nested_absmax,
                           nested_code, offset)
    _check_op_args(x, w, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, base_dtype)
    return _fwd_body(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features,
                     base_dtype, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)


def _check_op_args(x, w: NF4Weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, base_dtype,
                   dy=None, h=None):
    """The qlora ops' own checks, the weight's pieces validated here (once)."""
    check_x(x)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [M, in_features] tensor, got shape {tuple(x.shape)}")
    _check_weight(w, x.device)
    if dy is not None:
        check_backward_args(dy, x, h, lora_A, lora_B, *w.shape, scaling, dropout_p, dtypes=FLOAT_DTYPES)
    else:
        check_adapter_args(x, *w.shape, bias, lora_A, lora_B, scaling, dropout_p, False, dtypes=FLOAT_DTYPES)
    if base_dtype not in FLOAT_DTYPES:
        raise TypeError(f"base_dtype: expected float16, bfloat16 or float32, got {base_dtype}")
    check_op_backend(QLORA_BACKENDS, backend, x.device, qlora_reasons(x, lora_A.shape[0], base_dtype))
    check_seed(seed, dropout_p, x.device)


def _fwd_body(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features,
              base_dtype, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    w = NF4Weight._trusted(packed, absmax, [out_features, in_features], x.dtype, blocksize, nested_absmax,
                           nested_code, offset)
    y, h = forward_impl(x, w, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, base_dtype)
    return y, h.contiguous()


def forward_impl(x, w: NF4Weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed, backend: str,
                 base_dtype: torch.dtype | None = None):
    """The body of ``lorakern::qlora_fwd`` on a checked weight: ``(y [M, out], h [M, r])``.

    ``base_dtype`` other than x's (bitsandbytes' ``compute_dtype``): the base ``x W^T + bias`` is
    computed in it, as bitsandbytes does (x and bias cast to it, W decoded to it), then cast to
    x's dtype before the LoRA term, which is computed in x's dtype (as PEFT does)."""
    if base_dtype is not None and base_dtype != x.dtype:
        # bitsandbytes' own steps: W decoded to base_dtype (rounded there), one matmul in it.
        wd = decoded(w, base_dtype, backend)
        y = F.linear(x.to(base_dtype), wd, None if bias is None else bias.to(base_dtype)).to(x.dtype)
        h = apply_dropout(x, dropout_p, seed) @ lora_A.t()
        return y.addmm_(h, lora_B.t(), alpha=scaling), h
    if backend == "triton":
        from .triton.lora_fwd import lora_forward_triton

        return lora_forward_triton(x, decoded(w, x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)
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
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, base_dtype, bias,
      lora_A, lora_B, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lorakern::qlora_bwd", mutates_args=())
def qlora_bwd(
    dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
    nested_code: Tensor | None, offset: Tensor | None, blocksize: int, out_features: int, in_features: int,
    base_dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor, h: Tensor, scaling: float, dropout_p: float,
    seed: Tensor | None, needs_dx: bool, needs_dlora: bool, needs_dbias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads ``(dx [M, in], dA [r, in], dB [out, r], dbias [out])`` (one not asked for is empty):
    the LoRA terms as in :func:`lorakern.reference.lora_backward_reference`, and ``dY W`` of the
    base through the NF4 kernels' transposed product (or, with "triton", all of it by the fused
    Triton backward on W decoded again: W is never saved)."""
    w = NF4Weight._trusted(packed, absmax, [out_features, in_features], x.dtype, blocksize, nested_absmax,
                           nested_code, offset)
    _check_op_args(x, w, None, lora_A, lora_B, scaling, dropout_p, seed, backend, base_dtype, dy=dy, h=h)
    return _bwd_body(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features,
                     base_dtype, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias,
                     backend)


def _bwd_body(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features,
              base_dtype, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias, backend):
    w = NF4Weight._trusted(packed, absmax, [out_features, in_features], dy.dtype, blocksize, nested_absmax,
                           nested_code, offset)
    if backend == "triton":
        from .triton.lora_bwd import lora_backward_triton

        grads = lora_backward_triton(dy, x, decoded(w, dy.dtype), lora_A, lora_B, h, scaling, dropout_p, seed,
                                     needs_dx, needs_dlora, needs_dbias)
        return tuple(g.contiguous() for g in grads)
    _, dA, dB, dbias = lora_backward_reference(
        dy, x, None, lora_A, lora_B, h, scaling, dropout_p, seed, False, needs_dlora, needs_dbias
    )
    dx = dy.new_empty(0)
    if needs_dx:
        if base_dtype != dy.dtype:  # the base's grad in its own dtype, as bitsandbytes computes it
            dx = (dy.to(base_dtype) @ decoded(w, base_dtype, backend)).to(dy.dtype)
        else:
            dx = matmul_impl(dy, w, True, backend)
        dx = dx + apply_dropout((dy @ lora_B) * scaling @ lora_A, dropout_p, seed)
    return dx.contiguous(), dA.contiguous(), dB.contiguous(), dbias.contiguous()


@qlora_bwd.register_fake
def _(dy, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, in_features, base_dtype,
      lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias, backend):
    return fake_grads(dy, x, lora_A, lora_B, needs_dx, needs_dlora, needs_dbias)


# qlora_fwd's inputs by name: what its autograd saves and where each gradient goes.
FWD_INPUTS = tuple(a.name for a in torch.ops.lorakern.qlora_fwd.default._schema.arguments)
_AT = {name: i for i, name in enumerate(FWD_INPUTS)}


def _setup_context(ctx, inputs, output):
    named = dict(zip(FWD_INPUTS, inputs))
    _, h = output
    ctx.save_for_backward(*(named[k] for k in ("x", "packed", "absmax", "nested_absmax", "nested_code", "offset",
                                                "lora_A", "lora_B", "seed")), h)
    for k in ("blocksize", "out_features", "in_features", "base_dtype", "scaling", "dropout_p", "backend"):
        setattr(ctx, k, named[k])
    ctx.mark_non_differentiable(h)


def _grads(ctx, dy, bwd):
    x, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, seed, h = ctx.saved_tensors
    needs = dict(zip(FWD_INPUTS, ctx.needs_input_grad))
    needs_dlora = needs["lora_A"] or needs["lora_B"]
    dx, dA, dB, dbias = bwd(
        dy, x, packed, absmax, nested_absmax, nested_code, offset, ctx.blocksize, ctx.out_features,
        ctx.in_features, ctx.base_dtype, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, seed,
        needs["x"], needs_dlora, needs["bias"], ctx.backend,
    )
    grads = [None] * len(FWD_INPUTS)  # the 4-bit weight and every non-tensor input: none
    for name, g in (("x", dx), ("bias", dbias), ("lora_A", dA), ("lora_B", dB)):
        if needs[name]:
            grads[_AT[name]] = g
    return tuple(grads)


def _backward(ctx, dy, _dh):
    return _grads(ctx, dy, torch.ops.lorakern.qlora_bwd)


qlora_fwd.register_autograd(_backward, setup_context=_setup_context)
EagerQLoRA = eager_autograd(_fwd_body, _setup_context, lambda ctx, dy, _dh: _grads(ctx, dy, _bwd_body))


def qlora_linear(
    x: Tensor, weight: NF4Weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    dropout_p: float = 0.0, training: bool = True, backend: str = "auto", compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """QLoRA linear on ``x [..., in]`` -> ``[..., out]`` with an NF4 base ``weight [out, in]``.

    Computed in x's dtype (the base weight is decoded to it; under ``torch.autocast`` everything is
    cast to the autocast dtype first). ``compute_dtype`` (bitsandbytes' ``Linear4bit`` option, e.g.
    bfloat16 under fp32 activations): the base ``x W^T + bias`` is computed in it and cast back to
    x's dtype, the LoRA term stays in x's dtype, as PEFT on bitsandbytes does; outside autocast only.
    ``backend``: "auto", "native", "reference" or "triton" (see :func:`resolve_qlora_backend`).
    Gradients flow to x, bias, lora_A and lora_B; the 4-bit weight never gets one.
    """
    check_x(x)
    _check_weight(weight, x.device)
    if len(weight.shape) != 2:
        raise ValueError(f"weight: expected a 2-D [out, in] NF4 weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    cast = autocast_dtype(x.device.type)
    check_adapter_args(x, out_features, in_features, bias, lora_A, lora_B, scaling, dropout_p, cast is not None,
                       dtypes=FLOAT_DTYPES)
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype: expected None, float16, bfloat16 or float32, got {compute_dtype}")
    r = lora_A.shape[0]
    if cast is not None:
        x, bias, lora_A, lora_B = autocast_to(cast, x, bias, lora_A, lora_B)
    base_dtype = x.dtype if cast is not None or compute_dtype is None else compute_dtype
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None
    x2d = rows(x)
    chosen = resolve_qlora_backend(backend, x2d, r, base_dtype)
    args = (x2d, weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset,
            weight.blocksize, out_features, in_features, base_dtype, bias, lora_A, lora_B, float(scaling), p, seed,
            chosen)
    # Inference runs the forward body on the already checked weight (no rebuild from its tensors).
    y, _ = call_layer_op(torch.ops.lorakern.qlora_fwd, EagerQLoRA, args, (x, bias, lora_A, lora_B),
                         lambda: forward_impl(x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed, chosen,
                                                     base_dtype))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)
