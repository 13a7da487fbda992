"""What every op family shares: argument checks, autocast, the adapter's arguments, fake grads,
the autograd written once by argument name, and the choice between the op and its eager body.

A layer op is a pair of torch.library ops, ``<family>_fwd -> (y [M, out], *SAVED_OUTPUTS)`` and
``<family>_bwd -> (dx, dA, dB, dbias, dmagnitude)``. Their schemas carry the base weight's
arguments, then the adapter's (:data:`ADAPTER_ARGS`), then ``backend``; :class:`LayerAutograd`
reads both schemas to know what to save and where each gradient goes, so a family (or an adapter
variant adding an argument, as DoRA's magnitude does) never writes its own.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
from torch import Tensor

# The adapter's arguments, in the order every layer op's forward schema carries them (after the
# base weight's). ``seed``: the 0-d int64 dropout seed, None without dropout; ``magnitude``: DoRA's
# magnitude vector [out], None for plain LoRA.
ADAPTER_ARGS = ("bias", "lora_A", "lora_B", "scaling", "dropout_p", "seed", "magnitude")
# A forward op's outputs after y, saved for backward (never differentiable): h = dropout(x) A^T
# [M, r]; DoRA's z [M, out] (the adapted output before the magnitude scale, for dmagnitude) and
# weight norm [out] (fp32, fp64 for float64); both empty for plain LoRA, z also when no grad is wanted.
SAVED_OUTPUTS = ("h", "z", "norm")
# A backward op's outputs, in order, are the gradients of these forward inputs.
GRAD_OF = ("x", "lora_A", "lora_B", "bias", "magnitude")


class Adapter(NamedTuple):
    """One LoRA adapter as the op bodies take it: ``lora_A [r, in]``, ``lora_B [out, r]``, the
    scaling ``s``, dropout on the adapter's input with its seed (a 0-d int64 tensor, or None), and
    for DoRA the ``magnitude [out]`` (None: plain LoRA)."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout_p: float
    seed: Tensor | None
    magnitude: Tensor | None = None

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


def triton_ops():
    """The Triton launch sequences (:mod:`lorakern.triton.lora`), imported on first use: triton is
    optional (CPU installs)."""
    from ..triton import lora

    return lora


def check_tensor(name: str, t, optional: bool = False) -> None:
    """``t`` is a tensor (or None where ``optional``): checked before any of its attributes is read."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_x(x, dim: int | None = None) -> None:
    """``x [..., in_features]``; ``dim``: the rank it must have (ops take 2-D ``[M, in]``)."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape [..., in_features], got a 0-d tensor")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"x: expected a 2-D [M, in_features] tensor, got shape {tuple(x.shape)}")


def check_seed(seed, dropout_p: float, device) -> None:
    if dropout_p > 0.0:
        check_tensor("seed", seed)
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device != device:
            raise ValueError(f"seed: expected a 0-d int64 tensor on {device} (dropout_p={dropout_p}), "
                             f"got {seed.dtype} of shape {tuple(seed.shape)} on {seed.device}")


def rows(x: Tensor) -> Tensor:
    """``x [..., K]`` as ``[M, K]``: x itself when 2-D, else a view unless the leading dims cannot
    be merged. Also for K = 0, where ``reshape(-1, 0)`` is ambiguous."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def is_real(v) -> bool:
    """A Python number or a 0-d tensor (what ``float(v)`` takes), not a bool or a string."""
    if type(v) is float or type(v) is int:  # the common case, first: this runs on every call
        return True
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


def autocast_to(dtype: torch.dtype, *tensors):
    """``tensors`` cast to the autocast ``dtype`` (None stays None), as nn.Linear's inputs are."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def check_adapter_args(
    x, out_features: int, in_features: int, bias, lora_A, lora_B, scaling, dropout_p, autocasting: bool,
    base: dict | None = None, dtypes: tuple | None = None, magnitude=None, adapter_in: int | None = None,
) -> None:
    """The checks every LoRA entry point and op shares (dense or quantized base): x's last dim, the
    shapes of lora_A [r, in], lora_B [out, r], bias [out] and DoRA's magnitude [out], dropout_p and
    scaling, and that x, the ``base`` tensors, bias, lora_A, lora_B and magnitude share x's device
    and (outside autocast) dtype. ``dtypes``: the allowed dtypes (default: any floating point).
    ``adapter_in``: lora_A's columns when the adapter sees a pooled x (QA-LoRA: in_features / G).
    x itself is checked first, by :func:`check_x` (its device picks the autocast state)."""
    named = (("x", x), *(base.items() if base else ()), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B),
             ("magnitude", magnitude))
    for name, t in named:
        if not isinstance(t, Tensor) and (t is not None or name not in ("bias", "magnitude")):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dim in_features={in_features}, got shape {tuple(x.shape)}")
    check_adapter_shapes(out_features, in_features, bias, lora_A, lora_B, magnitude, adapter_in)
    if not is_real(dropout_p) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    check_scaling(scaling)
    device, dtype = x.device, x.dtype
    for name, t in named:
        if t is None:
            continue
        t_dtype = t.dtype
        if dtypes is None and not t_dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {t_dtype}")
        if dtypes is not None and t_dtype not in dtypes:
            raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {t_dtype}")
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of x), got {t.device}")
        if not autocasting and t_dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {t_dtype}")


def check_adapter_shapes(out_features: int, in_features: int, bias, lora_A, lora_B, magnitude=None,
                         adapter_in: int | None = None) -> None:
    """lora_A ``[r, in]`` (``[r, adapter_in]`` for a pooled adapter), lora_B ``[out, r]``, bias and
    magnitude ``[out]``: what :func:`check_adapter_args` and a merge both need (tensors checked)."""
    cols, what = (in_features, "in_features") if adapter_in is None else (adapter_in, "in_features / group_size")
    if lora_A.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A: expected 2-D [r, {what}] with r >= 1, got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != cols:
        raise ValueError(f"lora_A: expected shape [r, {cols}] (r, {what}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B: expected shape [{out_features}, {r}] (out_features, r), got {tuple(lora_B.shape)}")
    for name, t in (("bias", bias), ("magnitude", magnitude)):
        if t is not None and tuple(t.shape) != (out_features,):
            raise ValueError(f"{name}: expected shape [{out_features}] (out_features), got {tuple(t.shape)}")


def check_scaling(scaling) -> None:
    if not is_real(scaling) or not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite number, got {scaling!r}")


def check_backward_args(dy, x, h, lora_A, lora_B, out_features: int, in_features: int, scaling, dropout_p,
                        base: dict | None = None, dtypes: tuple | None = None, magnitude=None, z=None, norm=None,
                        needs_dlora: bool = True) -> None:
    """A backward op's own checks: ``dy [M, out]``, ``x [M, in]``, ``h [M, r]`` beside the adapter's
    ``lora_A [r, in]`` and ``lora_B [out, r]`` (and the ``base`` tensors), all on one device and in
    one dtype, as :func:`check_adapter_args` has them; with DoRA's ``magnitude``, the saved
    ``norm [out]`` (fp32) and, when the adapter's grads are asked for, ``z [M, out]``."""
    for name, t in (("dy", dy), ("x", x), ("h", h)):
        check_tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    saved = {"dy": dy, "h": h}
    if magnitude is not None and needs_dlora:
        check_tensor("z", z)
        saved["z"] = z
    check_adapter_args(x, out_features, in_features, None, lora_A, lora_B, scaling, dropout_p, False,
                       base={**(base or {}), **saved}, dtypes=dtypes, magnitude=magnitude)
    M, r = x.shape[0], lora_A.shape[0]
    for name, t, shape in (("dy", dy, (M, out_features)), ("h", h, (M, r)), ("z", saved.get("z"), (M, out_features))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape [{shape[0]}, {shape[1]}] (rows of x, "
                             f"{'r' if name == 'h' else 'out_features'}), got {tuple(t.shape)}")
    if magnitude is not None:
        check_tensor("norm", norm)
        dtype = norm_dtype(x.dtype)
        if tuple(norm.shape) != (out_features,) or norm.dtype != dtype or norm.device != x.device:
            raise ValueError(f"norm: expected a {dtype} tensor of shape [{out_features}] on {x.device}, "
                             f"got {norm.dtype} of shape {tuple(norm.shape)} on {norm.device}")


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """DoRA's weight norm is computed and saved in fp32 (fp64 for float64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def fake_grads(dy, x, lora_A, lora_B, magnitude, needs_dx: bool, needs_dlora: bool, needs_dbias: bool):
    """Shapes of a backward op's ``(dx, dA, dB, dbias, dmagnitude)``: an entry not asked for is empty."""
    def maybe(flag, *shape, like):
        return like.new_empty(shape if flag else (0,))

    return (
        maybe(needs_dx, *x.shape, like=dy),
        maybe(needs_dlora, *lora_A.shape, like=lora_A),
        maybe(needs_dlora, *lora_B.shape, like=lora_B),
        maybe(needs_dbias, dy.shape[1], like=dy),
        maybe(needs_dlora and magnitude is not None, dy.shape[1], like=dy if magnitude is None else magnitude),
    )


def fake_saved(x, out_features: int, r: int, magnitude):
    """Shapes of a forward op's saved outputs ``(h, z, norm)`` (z, norm empty without DoRA)."""
    dora = magnitude is not None
    return (x.new_empty(x.shape[0], r), x.new_empty((x.shape[0], out_features) if dora else (0,)),
            x.new_empty(out_features if dora else 0, dtype=norm_dtype(x.dtype)))


def _getter(indices: list[int]):
    """``f(seq) -> tuple(seq[i] for i in indices)``, as one C call."""
    if not indices:
        return lambda seq: ()
    get = operator.itemgetter(*indices)
    return get if len(indices) > 1 else lambda seq: (get(seq),)


def _is_tensor_arg(arg) -> bool:
    t = arg.type
    if isinstance(t, torch._C.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch._C.TensorType)


class LayerAutograd:
    """The autograd of a layer op, by argument name: written once for every family.

    Saved: the forward's tensor inputs that the backward op takes (x, the base weight's tensors,
    lora_A, lora_B, the 0-d seed, DoRA's magnitude) and the forward's :data:`SAVED_OUTPUTS`. No
    dropout mask, no dropout(x): backward regenerates the mask from the seed; a quantized base
    stays quantized. The backward op's ``needs_dx`` / ``needs_dlora`` (A, B and the magnitude) /
    ``needs_dbias`` come from which inputs need a grad; every input that is not in
    :data:`GRAD_OF` (the frozen base, every non-tensor) gets None.
    """

    def __init__(self, fwd: str, bwd: str):
        fwd_args = getattr(torch.ops.lorakern, fwd).default._schema.arguments
        names = [a.name for a in fwd_args]
        start = names.index(ADAPTER_ARGS[0])
        if tuple(names[start:start + len(ADAPTER_ARGS)]) != ADAPTER_ARGS or names[-1] != "backend":
            raise TypeError(f"lorakern::{fwd}: a layer op's schema ends in {ADAPTER_ARGS + ('backend',)}")
        bwd_names = [a.name for a in getattr(torch.ops.lorakern, bwd).default._schema.arguments]
        kept = [i for i, a in enumerate(fwd_args) if a.name in bwd_names]
        saved = [i for i in kept if _is_tensor_arg(fwd_args[i])]
        attrs = [i for i in kept if not _is_tensor_arg(fwd_args[i])]
        # Per call, the backward's arguments are picked by index from one tuple:
        # (*saved tensors, *saved outputs, *non-tensor inputs, dy, needs_dx, needs_dlora, needs_dbias).
        pool = [names[i] for i in saved] + list(SAVED_OUTPUTS) + [names[i] for i in attrs]
        pool += ["dy", "needs_dx", "needs_dlora", "needs_dbias"]
        self._pick = operator.itemgetter(*(pool.index(n) for n in bwd_names))
        self._saved, self._attrs = _getter(saved), _getter(attrs)
        self._grad_of = [names.index(n) for n in GRAD_OF]
        self._x, self._A, self._B, self._bias, self._m = self._grad_of
        self._n = len(names)

    def setup_context(self, ctx, inputs, output):
        ctx.save_for_backward(*self._saved(inputs), *output[1:])
        ctx.attrs = self._attrs(inputs)
        ctx.mark_non_differentiable(*output[1:])

    def backward(self, ctx, dy, bwd):
        """The forward's input grads from ``bwd`` (the backward op, or its eager body)."""
        needs = ctx.needs_input_grad
        pool = (*ctx.saved_tensors, *ctx.attrs, dy, needs[self._x], needs[self._A] or needs[self._B] or needs[self._m],
                needs[self._bias])
        out = bwd(*self._pick(pool))
        grads = [None] * self._n
        for i, g in zip(self._grad_of, out):
            if needs[i]:
                grads[i] = g
        return tuple(grads)

    def register(self, op, bwd_op) -> None:
        """``op``'s autograd (under torch.compile and for direct calls of the public op)."""
        op.register_autograd(lambda ctx, dy, *_saved: self.backward(ctx, dy, bwd_op), setup_context=self.setup_context)

    def eager(self, fwd_body, bwd_body) -> type[torch.autograd.Function]:
        """The same autograd as an ``autograd.Function`` that runs the op's bodies directly.
        Outside torch.compile the op's dispatch and autograd wrapper cost ~50 us a call (LoRA at
        1 x 16 x 16 on CPU: 67 us against 13 us for the body), more than a small layer's kernels
        on a GPU."""
        autograd = self

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                out = fwd_body(*inputs)
                autograd.setup_context(ctx, inputs, out)
                return out

            @staticmethod
            def backward(ctx, dy, *_saved):
                return autograd.backward(ctx, dy, bwd_body)

        return Eager


def call_layer_op(op, eager, args, inputs, infer):
    """``y`` of a layer op on ``args``: the op itself under torch.compile (traced without graph
    breaks), its ``eager`` Function when one of ``inputs`` needs a grad, else ``infer()`` (the
    forward body alone: inference, decode, serving)."""
    if torch.compiler.is_compiling():
        return op(*args)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return eager.apply(*args)[0]
    return infer()[0]
