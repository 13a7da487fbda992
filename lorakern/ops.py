"""The LoRA linear as torch.library ops, its autograd, and the functional entry point.

Data flows one way: ``lora_linear`` (checks, autocast, backend choice) -> ``lorakern::lora_fwd`` /
``lorakern::lora_bwd`` (custom ops, so torch.compile traces them without graph breaks and
``torch.library.opcheck`` passes) -> the reference or the Triton launchers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backend import LORA_BACKENDS, check_op_backend, resolve_backend, triton_unavailable_reason
from .dropout import draw_seed
from .reference import lora_backward_reference, lora_forward_reference


@torch.library.custom_op("lorakern::lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` -> ``(y [M, N], h [M, r])`` with ``y = x W^T + bias + s * h B^T``, ``h = dropout(x) A^T``.

    The op is public (``torch.ops.lorakern.lora_fwd``): it checks its own arguments, as
    :func:`lora_linear` does, before any kernel sees a pointer."""
    _check_op_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
    return forward_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)


def _check_op_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    check_x(x)
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, autocasting=False)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [M, in_features] tensor, got shape {tuple(x.shape)}")
    _check_op_backend(backend, x, lora_A.shape[0], seed, dropout_p)


def _check_op_backend(backend: str, x: Tensor, r: int, seed, dropout_p: float) -> None:
    """An op called with ``backend`` can run it on ``x`` (an explicit name that cannot raises,
    as :func:`resolve_backend` does), and has a seed when it has dropout."""
    check_op_backend(LORA_BACKENDS, backend, x.device, {"triton": lambda: triton_unavailable_reason(x, r)})
    check_seed(seed, dropout_p, x.device)


def check_seed(seed, dropout_p: float, device) -> None:
    if dropout_p > 0.0:
        check_tensor("seed", seed)
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device != device:
            raise ValueError(f"seed: expected a 0-d int64 tensor on {device} (dropout_p={dropout_p}), "
                             f"got {seed.dtype} of shape {tuple(seed.shape)} on {seed.device}")


def forward_impl(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed, backend: str):
    """The body of ``lorakern::lora_fwd``: ``(y [M, N], h [M, r])``."""
    if backend == "triton":
        from .triton.lora_fwd import lora_forward_triton

        return lora_forward_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    y, h = lora_forward_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
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
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    check_backward_args(dy, x, h, lora_A, lora_B, *weight.shape, scaling, dropout_p, base={"weight": weight})
    _check_op_backend(backend, x, lora_A.shape[0], seed, dropout_p)
    return backward_impl(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora,
                         needs_dbias, backend)


def backward_impl(dy, x, weight, lora_A, lora_B, h, scaling: float, dropout_p: float, seed,
                  needs_dx: bool, needs_dlora: bool, needs_dbias: bool, backend: str):
    """The body of ``lorakern::lora_bwd``."""
    if backend == "triton":
        from .triton.lora_bwd import lora_backward_triton

        return lora_backward_triton(
            dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias
        )
    grads = lora_backward_reference(
        dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias
    )
    return tuple(g.contiguous() for g in grads)


def fake_grads(dy, x, lora_A, lora_B, needs_dx: bool, needs_dlora: bool, needs_dbias: bool):
    """Shapes of a backward op's ``(dx, dA, dB, dbias)``: an entry not asked for is empty."""
    def maybe(flag, *shape, like):
        return like.new_empty(shape if flag else (0,))

    return (
        maybe(needs_dx, *x.shape, like=dy),
        maybe(needs_dlora, *lora_A.shape, like=lora_A),
        maybe(needs_dlora, *lora_B.shape, like=lora_B),
        maybe(needs_dbias, dy.shape[1], like=dy),
    )


@lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, needs_dx, needs_dlora, needs_dbias, backend):
    return fake_grads(dy, x, lora_A, lora_B, needs_dx, needs_dlora, needs_dbias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, h = output
    # Saved: x and h [M, r] (plus the parameters and a 0-d seed). No mask, no dropout(x), nothing
    # else of size [M, K]: backward regenerates the mask from the seed.
    ctx.save_for_backward(x, weight, lora_A, lora_B, h, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(h)


def _grads(ctx, dy, bwd):
    x, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_dx, needs_dbias, needs_dlora = needs[0], needs[2], needs[3] or needs[4]
    dx, dA, dB, dbias = bwd(
        dy, x, weight, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, seed,
        needs_dx, needs_dlora, needs_dbias, ctx.backend,
    )
    return (
        dx if needs_dx else None,
        None,  # weight is frozen: never a gradient
        dbias if needs_dbias else None,
        dA if needs[3] else None,
        dB if needs[4] else None,
        None, None, None, None,
    )


def _backward(ctx, dy, _dh):
    return _grads(ctx, dy, torch.ops.lorakern.lora_bwd)


lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def eager_autograd(forward, setup_context, backward):
    """A custom op's registered autograd as an ``autograd.Function`` that runs the op's bodies
    directly: ``forward(*inputs)``, ``setup_context(ctx, inputs, output)``, ``backward(ctx, *grads)``.
    Outside torch.compile the op's dispatch and autograd wrapper cost ~50 us a call (LoRA at
    1 x 16 x 16 on CPU: 67 us against 13 us for the body), more than a small layer's kernels on a GPU."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out = forward(*inputs)
            setup_context(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return Eager


EagerLoRA = eager_autograd(forward_impl, _setup_context, lambda ctx, dy, _dh: _grads(ctx, dy, backward_impl))


def call_layer_op(op, eager, args, inputs, infer):
    """``(y, h)`` of a layer op on ``args``: the op itself under torch.compile (traced without graph
    breaks), its ``eager`` Function when one of ``inputs`` needs a grad, else ``infer()`` (the
    forward body alone: inference, decode, serving)."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return eager.apply(*args)
    return infer()


def check_tensor(name: str, t, optional: bool = False) -> None:
    """``t`` is a tensor (or None where ``optional``): checked before any of its attributes is read."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_x(x) -> None:
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape [..., in_features], got a 0-d tensor")


def rows(x: Tensor) -> Tensor:
    """``x [..., K]`` as ``[M, K]``: x itself when 2-D, else a view unless the leading dims cannot
    be merged. Also for K = 0, where ``reshape(-1, 0)`` is ambiguous."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _is_real(v) -> bool:
    """A Python number or a 0-d tensor (what ``float(v)`` takes), not a bool or a string."""
    if isinstance(v, Tensor):
        return v.dim() == 0 and not v.is_complex()
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``device_type`` when autocast is on there, else None. Device types
    without autocast (meta, ...) are never autocasting: ``nn.Linear`` works on them."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast" (meta)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def check_adapter_args(
    x, out_features: int, in_features: int, bias, lora_A, lora_B, scaling, dropout_p, autocasting: bool,
    base: dict | None = None, dtypes: tuple | None = None,
) -> None:
    """The checks every LoRA entry point and op shares (dense or NF4 base): x's last dim, the
    shapes of lora_A [r, in], lora_B [out, r] and bias [out], dropout_p and scaling, and that x,
    the ``base`` tensors, bias, lora_A and lora_B share x's device and (outside autocast) dtype.
    ``dtypes``: the allowed dtypes (default: any floating point). x itself is checked first, by
    :func:`check_x` (its device picks the autocast state)."""
    named = {"x": x, **(base or {}), "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, t in named.items():
        if not isinstance(t, Tensor) and (t is not None or name != "bias"):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dim in_features={in_features}, got shape {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A: expected 2-D [r, in_features] with r >= 1, got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A: expected shape [r, {in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B: expected shape [{out_features}, {r}] (out_features, r), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape [{out_features}], got {tuple(bias.shape)}")
    if not _is_real(dropout_p) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    if not _is_real(scaling) or not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite number, got {scaling!r}")
    for name, t in named.items():
        if t is None:
            continue
        if dtypes is None and not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
        if not autocasting and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")


def check_backward_args(dy, x, h, lora_A, lora_B, out_features: int, in_features: int, scaling, dropout_p,
                        base: dict | None = None, dtypes: tuple | None = None) -> None:
    """A backward op's own checks: ``dy [M, out]``, ``x [M, in]``, ``h [M, r]`` beside the adapter's
    ``lora_A [r, in]`` and ``lora_B [out, r]`` (and the ``base`` tensors), all on one device and in
    one dtype, as :func:`check_adapter_args` has them."""
    for name, t in (("dy", dy), ("x", x), ("h", h)):
        check_tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    check_adapter_args(x, out_features, in_features, None, lora_A, lora_B, scaling, dropout_p, False,
                       base={**(base or {}), "dy": dy, "h": h}, dtypes=dtypes)
    M, r = x.shape[0], lora_A.shape[0]
    if tuple(dy.shape) != (M, out_features):
        raise ValueError(f"dy: expected shape [{M}, {out_features}] (rows of x, out_features), got {tuple(dy.shape)}")
    if tuple(h.shape) != (M, r):
        raise ValueError(f"h: expected shape [{M}, {r}] (rows of x, r), got {tuple(h.shape)}")


def autocast_to(dtype: torch.dtype, *tensors):
    """``tensors`` cast to the autocast ``dtype`` (None stays None), as nn.Linear's inputs are."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, autocasting: bool):
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.requires_grad:
        raise ValueError("weight: must be frozen (requires_grad=False); lorakern never computes its gradient")
    check_adapter_args(x, *weight.shape, bias, lora_A, lora_B, scaling, dropout_p, autocasting,
                       base={"weight": weight})


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
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, cast is not None)
    if cast is not None:
        x, weight, bias, lora_A, lora_B = autocast_to(cast, x, weight, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    seed = draw_seed(x.device) if p > 0.0 else None
    x2d = rows(x)
    chosen = resolve_backend(backend, x2d, lora_A.shape[0])
    args = (x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed, chosen)
    y, _ = call_layer_op(torch.ops.lorakern.lora_fwd, EagerLoRA, args, (x, bias, lora_A, lora_B),
                         lambda: forward_impl(*args))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])  # 2-D: no view (FSDP2 hooks)
