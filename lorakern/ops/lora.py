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
from . import dora
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
    fake_saved,
    norm_dtype,
    rows,
    triton_ops,
)


def forward_body(x: Tensor, base, bias: Tensor | None, adapter: Adapter, backend: str, base_dtype=None,
                 keep_z: bool = True):
    """``x [M, in]`` -> ``(y [M, out], h [M, r], z, norm)``: ``y = base(x) + bias + s * h B^T``,
    ``h = dropout(x) A^T``; the base in ``base_dtype`` when given (see the bases' ``linear``).
    With ``adapter.magnitude``, DoRA (:mod:`.dora`; ``z`` is kept for backward only with ``keep_z``);
    else ``z`` and ``norm`` are empty."""
    if adapter.magnitude is not None:
        return dora.forward(x, base, bias, adapter, backend, base_dtype, keep_z)
    A, B, s, p, seed, _ = adapter
    if backend == "triton":
        y, h = triton_ops().forward(x, base.dequantize(x.dtype, backend), bias, A, B, s, p, seed)
        return y, h, *_no_dora(x)
    one_dtype = base_dtype is None or base_dtype == x.dtype
    fused = base.fused_forward(x, bias, adapter, backend) if one_dtype else None
    if fused is not None:
        return (*fused, *_no_dora(x))
    h = apply_dropout(x, p, seed) @ A.t()
    y = base.linear(x, bias, backend, base_dtype)  # a new tensor: the LoRA term is added in place
    return y.add_((h @ B.t()).mul_(s)), h, *_no_dora(x)


def _no_dora(x: Tensor) -> tuple[Tensor, Tensor]:
    """The empty ``(z, norm)`` of a plain LoRA forward (distinct: op outputs may not alias)."""
    return x.new_empty(0), x.new_empty(0, dtype=norm_dtype(x.dtype))


def backward_body(dy: Tensor, x: Tensor, base, adapter: Adapter, h: Tensor, z: Tensor, norm: Tensor, needs_dx: bool,
                  needs_dlora: bool, needs_dbias: bool, backend: str, base_dtype=None):
    """``(dx [M, in], dA [r, in], dB [out, r], dbias [out], dmagnitude [out])`` (one not asked for,
    and dmagnitude without DoRA, is empty); W frozen. "triton" decodes a quantized base again (W is
    never saved)."""
    A, B, s, p, seed, m = adapter
    if m is not None:
        grads = dora.backward(dy, x, base, adapter, h, z, norm, needs_dx, needs_dlora, needs_dbias, backend,
                              base_dtype)
    elif backend == "triton":
        grads = (*triton_ops().backward(dy, x, base.dequantize(dy.dtype, backend), A, B, h, s, p, seed,
                                     needs_dx, needs_dlora, needs_dbias), dy.new_empty(0))
    else:
        dx_base = base.grad_input(dy, backend, base_dtype) if needs_dx else None
        grads = (*lora_backward_reference(dy, x, None, A, B, h, s, p, seed, needs_dx, needs_dlora, needs_dbias,
                                          dx_base), dy.new_empty(0))
    return tuple(g.contiguous() for g in grads)


# -- the dense ops --------------------------------------------------------------------------------

@torch.library.custom_op("lorakern::lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Tensor | None, magnitude: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x [M, K]`` -> ``(y [M, N], h [M, r], z, norm)`` with ``y = x W^T + bias + s * h B^T``,
    ``h = dropout(x) A^T``; with DoRA's ``magnitude [N]``, ``y`` is DoRA's and ``z [M, N]``,
    ``norm [N]`` are saved for backward (see :mod:`.dora`), else both are empty.

    The op is public (``torch.ops.lorakern.lora_fwd``): it checks its own arguments, as
    :func:`lora_linear` does, before any kernel sees a pointer."""
    check_x(x, dim=2)
    check_dense_weight(weight)
    check_adapter_args(x, *weight.shape, bias, lora_A, lora_B, scaling, dropout_p, False, base={"weight": weight},
                       magnitude=magnitude)
    _check_op_backend(backend, x, lora_A.shape[0], seed, dropout_p)
    return _fwd_body(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, magnitude, backend)


def _fwd_body(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, magnitude, backend, keep_z=True):
    y, h, z, norm = forward_body(x, DenseBase(weight), bias, Adapter(lora_A, lora_B, scaling, dropout_p, seed,
                                                                      magnitude), backend, keep_z=keep_z)
    return y.contiguous(), h.contiguous(), z.contiguous(), norm.clone()  # the norm may be cached


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, magnitude, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), *fake_saved(x, weight.shape[0], lora_A.shape[0], magnitude)


@torch.library.custom_op("lorakern::lora_bwd", mutates_args=())
def lora_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: Tensor | None, magnitude: Tensor | None, z: Tensor, norm: Tensor,
    needs_dx: bool, needs_dlora: bool, needs_dbias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads ``(dx [M, K], dA [r, K], dB [N, r], dbias [N], dmagnitude [N])``; one not asked for
    (and dmagnitude without DoRA) is empty. ``z``, ``norm``: the forward's, for DoRA."""
    check_dense_weight(weight, frozen=False)
    check_backward_args(dy, x, h, lora_A, lora_B, *weight.shape, scaling, dropout_p, base={"weight": weight},
                        magnitude=magnitude, z=z, norm=norm, needs_dlora=needs_dlora)
    _check_op_backend(backend, x, lora_A.shape[0], seed, dropout_p)
    return _bwd_body(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, magnitude, z, norm, needs_dx,
                     needs_dlora, needs_dbias, backend)


def _bwd_body(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, magnitude, z, norm, needs_dx, needs_dlora,
              needs_dbias, backend):
    return backward_body(dy, x, DenseBase(weight), Adapter(lora_A, lora_B, scaling, dropout_p, seed, magnitude), h,
                         z, norm, needs_dx, needs_dlora, needs_dbias, backend)


@lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, magnitude, z, norm, needs_dx, needs_dlora,
      needs_dbias, backend):
    return fake_grads(dy, x, lora_A, lora_B, magnitude, needs_dx, needs_dlora, needs_dbias)


_autograd = LayerAutograd("lora_fwd", "lora_bwd")
_autograd.register(lora_fwd, torch.ops.lorakern.lora_bwd)
EagerLoRA = _autograd.eager(_fwd_body, _bwd_body)


def check_dense_weight(weight, frozen: bool = True) -> None:
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
    magnitude: Tensor | None = None,
) -> Tensor:
    """LoRA linear ``y = x W^T + bias + scaling * (dropout(x) A^T) B^T``, or DoRA with ``magnitude``.

    Args:
        x: ``[..., in_features]``, any leading dims and strides.
        weight: frozen base weight ``[out_features, in_features]`` (requires_grad must be False).
        bias: ``[out_features]`` or None.
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]``.
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout on the LoRA branch's input, applied only when ``training``.
        backend: "auto" (Triton on CUDA, else the reference, with a one-time warning), "reference",
            or "triton" (raises if it cannot serve the inputs).
        magnitude: DoRA's magnitude vector ``[out_features]`` (PEFT's ``lora_magnitude_vector``), or
            None for plain LoRA. With it, ``y = x W^T + bias + (g - 1) (x~ W^T) + g s (x~ A^T) B^T``
            with ``g = magnitude / ||W + s B A||_row`` (the norm detached, as PEFT and the DoRA paper
            have it) and ``x~ = dropout(x)``: without dropout, ``g (x W^T + s x A^T B^T) + bias``.

    Returns ``y [..., out_features]``. Under ``torch.autocast`` every input is cast to the autocast
    dtype, as ``nn.Linear`` does.
    """
    check_x(x)
    cast = autocast_dtype(x.device.type)
    check_dense_weight(weight)
    check_adapter_args(x, *weight.shape, bias, lora_A, lora_B, scaling, dropout_p, cast is not None,
                       base={"weight": weight}, magnitude=magnitude)
    if cast is not None:
        x, weight, bias, lora_A, lora_B, magnitude = autocast_to(cast, x, weight, bias, lora_A, lora_B, magnitude)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None
    x2d = rows(x)
    chosen = resolve_lora(backend, x2d, lora_A.shape[0])
    args = (x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed, magnitude, chosen)
    y = call_layer_op(torch.ops.lorakern.lora_fwd, EagerLoRA, args, (x, bias, lora_A, lora_B, magnitude),
                      lambda: _fwd_body(*args, keep_z=False))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])  # 2-D: no view (FSDP2 hooks)
