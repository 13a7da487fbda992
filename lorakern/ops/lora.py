"""Dense LoRA: the ops ``lorakern::lora_fwd`` / ``lorakern::lora_bwd``, their checks, fake and
autograd, the entry point :func:`lora_linear`, and the LoRA bodies every family runs.

``forward_body`` / ``backward_body`` take a base weight (:mod:`.bases`) and an
:class:`~.common.Adapter`: "triton" runs the fused kernels of :mod:`lorakern.triton.lora` on the
base's dense W; "reference" and "native" compute the base through the base (its small-M kernels,
its tiled decode) and the LoRA term in plain torch, in PEFT's order (base, then
``(dropout(x) A^T) B^T * s`` added), so on one dtype it rounds like PEFT.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import check_op_backend, lora_reasons, resolve_lora
from ..dropout import apply_dropout, draw_seed
from ..reference import lora_backward_reference
from .bases import DenseBase
from .common import (
    Adapter,
    LayerAutograd,
    autocast_dtype,
    autocast_to,
    call_layer_op,
    check_adapter_args,
    check_backward_args,
    check_seed,
    check_tensor,
    check_x,
    fake_grads,
    rows,
)


def _triton():
    """The Triton launch sequences, imported on first use: triton is optional (CPU installs)."""
    from ..triton import lora

    return lora


def forward_body(x: Tensor, base, bias: Tensor | None, adapter: Adapter, backend: str, base_dtype=None):
    """``x [M, in]`` -> ``(y [M, out], h [M, r])``: ``y = base(x) + bias + s * h B^T``,
    ``h = dropout(x) A^T``; the base in ``base_dtype`` when given (see the bases' ``linear``)."""
    A, B, s, p, seed = adapter
    if backend == "triton":
        return _triton().forward(x, base.dequantize(x.dtype, backend), bias, A, B, s, p, seed)
    one_dtype = base_dtype is None or base_dtype == x.dtype
    fused = base.fused_forward(x, bias, adapter, backend) if one_dtype else None
    if fused is not None:
        return fused
    h = apply_dropout(x, p, seed) @ A.t()
    y = base.linear(x, bias, backend, base_dtype)  # a new tensor: the LoRA term is added in place
    return y.add_((h @ B.t()).mul_(s)), h


def backward_body(dy: Tensor, x: Tensor, base, adapter: Adapter, h: Tensor, needs_dx: bool, needs_dlora: bool,
                  needs_dbias: bool, backend: str, base_dtype=None):
    """``(dx [M, in], dA [r, in], dB [out, r], dbias [out])`` (one not asked for is empty); W frozen.
    "triton" decodes a quantized base again (W is never saved)."""
    A, B, s, p, seed = adapter
    if backend == "triton":
        grads = _triton().backward(dy, x, base.dequantize(dy.dtype, backend), A, B, h, s, p, seed,
                                   needs_dx, needs_dlora, needs_dbias)
    else:
        dx_base = base.grad_input(dy, backend, base_dtype) if needs_dx else None
        grads = lora_backward_reference(dy, x, None, A, B, h, s, p, seed, needs_dx, needs_dlora, needs_dbias,
                                        dx_base)
    dx, dA, dB, dbias = grads
    return dx.contiguous(), dA.contiguous(), dB.contiguous(), dbias.contiguous()


# -- the dense ops --------------------------------------------------------------------------------

@torch.library.custom_op("lorakern::lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` -> ``(y [M, N], h [M, r])`` with ``y = x W^T + bias + s * h B^T``, ``h = dropout(x) A^T``.

    The op is public (``torch.ops.lorakern.lora_fwd``): it checks its own arguments, as
    :func:`lora_linear` does, before any kernel sees a pointer."""
    check_x(x, dim=2)
    _check_weight(weight)
    check_adapter_args(x, *weight.shape, bias, lora_A, lora_B, scaling, dropout_p, False, base={"weight": weight})
    _check_op_backend(backend, x, lora_A.shape[0], seed, dropout_p)
    return _fwd_body(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)


def _fwd_body(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    y, h = forward_body(x, DenseBase(weight), bias, Adapter(lora_A, lora_B, scaling, dropout_p, seed), backend)
    return y.contiguous(), h.contiguous()


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lorakern::lora_bwd", mutates_args=())
def lora_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: Tensor | None,
    needs_dx: bool, needs_dlora: bool, needs_dbias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads ``(dx [M, K], dA [r, K], dB [N, r], dbias [N])``; one not asked for is empty."""
    _check_weight(weight, frozen=False)
    check_backward_args(dy, x, h, lora_A, lora_B, *weight.shape, scaling, dropout_p, base={"weight": weight})
    _check_op_backend(backend, x, lora_A.shape[0], seed, dropout_p)
    return _bwd_body(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias,
                     backend)


def _bwd_body(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias,
              backend):
    return backward_body(dy, x, DenseBase(weight), Adapter(lora_A, lora_B, scaling, dropout_p, seed), h,
                         needs_dx, needs_dlora, needs_dbias, backend)


@lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias, backend):
    return fake_grads(dy, x, lora_A, lora_B, needs_dx, needs_dlora, needs_dbias)


_autograd = LayerAutograd("lora_fwd", "lora_bwd")
_autograd.register(lora_fwd, torch.ops.lorakern.lora_bwd)
EagerLoRA = _autograd.eager(_fwd_body, _bwd_body)


def _check_weight(weight, frozen: bool = True) -> None:
    """``weight [out, in]``; ``frozen``: it must not require a grad (the forward's entry points)."""
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if frozen and weight.requires_grad:
        raise ValueError("weight: must be frozen (requires_grad=False); lorakern never computes its gradient")


def _check_op_backend(backend: str, x: Tensor, r: int, seed, dropout_p: float) -> None:
    """An op called with ``backend`` can run it on ``x`` (an explicit name that cannot raises),
    and has a seed when it has dropout."""
    check_op_backend("LoRA", backend, x.device, lora_reasons(x, r))
    check_seed(seed, dropout_p, x.device)


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float = 0.0, training: bool = True, backend: str = "auto",
) -> Tensor:
    """LoRA linear ``y = x W^T + bias + scaling * (dropout(x) A^T) B^T``.

    Args:
        x: ``[..., in_features]``, any leading dims and strides.
        weight: frozen base weight ``[out_features, in_features]`` (requires_grad must be False).
        bias: ``[out_features]`` or None.
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]``.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout on the LoRA branch's input, applied only when ``training``.
        backend: "auto" (Triton on CUDA, else the reference, with a one-time warning), "reference",
            or "triton" (raises if it cannot serve the inputs).

    Returns ``y [..., out_features]``. Under ``torch.autocast`` every input is cast to the autocast
    dtype, as ``nn.Linear`` does.
    """
    check_x(x)
    cast = autocast_dtype(x.device.type)
    _check_weight(weight)
    check_adapter_args(x, *weight.shape, bias, lora_A, lora_B, scaling, dropout_p, cast is not None,
                       base={"weight": weight})
    if cast is not None:
        x, weight, bias, lora_A, lora_B = autocast_to(cast, x, weight, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None
    x2d = rows(x)
    chosen = resolve_lora(backend, x2d, lora_A.shape[0])
    args = (x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed, chosen)
    y, _ = call_layer_op(torch.ops.lorakern.lora_fwd, EagerLoRA, args, (x, bias, lora_A, lora_B),
                         lambda: _fwd_body(*args))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])  # 2-D: no view (FSDP2 hooks)
