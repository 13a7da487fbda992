"""A QLoRA layer's CPU decode call without the per-call checks: the kernel call of
:meth:`~lorakern.ops.bases.NF4Base.fused_forward`, remembered after the checked path has served a
call with the same tensors. Owners: :class:`~lorakern.FusedLoRALinear` with an NF4 base, and a
fused PEFT layer on a bitsandbytes NF4 base (after PEFT's own state, active adapters, hooks and
so on, has been checked for the call by ``runtime_reason``).

Why: at M = 1 the checks, the backend choice and the autograd dispatch of :func:`lorakern.qlora_linear`
cost ~40 us of Python a call (a 64 x 64 layer, hot, AMD EPYC Zen 4: 52 us a call without the plan,
18 us with it, 13 us for the kernel's own wrapper). On a 4096 x 4096 weight (~0.9 ms a call, 2
threads) that is a few percent: the plan measured 0.96x to 1.0x the checked path's time,
interleaved, with 8 layers rotating past the L3.

What a plan holds is a function of its key: every tensor the kernel reads (address, dtype, shape,
strides, device) and the call's scaling and backend, read again on every call, so an adapter
swapped, a parameter's ``.data`` replaced, a weight moved or re-quantized, or a changed scaling
takes the checked path (which raises what it raises) and a new plan. Values changed in place need
nothing: the kernel reads them where they are. x is checked on every call (plain tensor, CPU,
the adapter's dtype, contiguous, ``[..., in]`` with rows the one-call kernel takes:
``cpu_call_takes``); grads, dropout in training, DoRA, autocast and torch.compile take the
checked path.
"""

from __future__ import annotations

import torch

from ..ops.bases import cpu_call_rows, cpu_call_takes
from . import native


def _meta(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride(), t.device)


def _key(w, bias, A, B, scaling, backend) -> tuple:
    return (scaling, backend, w.shape, w.dtype, w.blocksize, _meta(A), _meta(B), _meta(bias), _meta(w.packed),
            _meta(w.absmax), _meta(w.nested_absmax), _meta(w.nested_code), _meta(w.offset))


class DecodePlan:
    """The arguments of one layer's native CPU QLoRA call (see the module docstring)."""

    __slots__ = ("key", "weight", "lora", "r", "out_features", "in_features", "x_dtype", "dtypes")

    def __init__(self, key: tuple, x_dtype: torch.dtype, w, bias, A, B, scaling):
        self.key = key
        self.x_dtype = x_dtype
        self.out_features, self.in_features = w.shape
        self.r = A.shape[0]
        self.weight = native.weight_args(w, self.out_features, self.in_features)
        self.lora = (A.data_ptr(), B.data_ptr(), 0 if bias is None else bias.data_ptr(), float(scaling), self.r)
        # x's, the adapter's and the bias's dtype codes for the call (the adapter and the bias
        # float32 beside a half x only in a plan made by serve_mixed)
        self.dtypes = dict(x_dtype=native.OUT_DTYPES[x_dtype], lora_dtype=native.OUT_DTYPES[A.dtype],
                           bias_dtype=-1 if bias is None else native.OUT_DTYPES[bias.dtype])


def _rows(x: torch.Tensor) -> int:
    """x's rows as the kernel sees them (x viewed as [rows, in])."""
    return x.numel() // max(1, x.shape[-1])


def _mode_allows(x, bias, A, B, train_dropout: bool, magnitude) -> bool:
    """The layer's mode and x's kind: not traced, a plain tensor of rank >= 2, no DoRA magnitude or
    dropout in training, no grad needed, no autocast."""
    if torch.compiler.is_compiling():  # traced: the checked path's custom op
        return False
    if type(x) is not torch.Tensor or x.dim() < 2:
        return False
    if magnitude is not None or train_dropout:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not torch.is_autocast_enabled("cpu")


def _call_allows(x, bias, A, B, train_dropout: bool, magnitude) -> bool:
    """What the plan needs of this call and the layer's mode (the rest is in the key)."""
    return (_mode_allows(x, bias, A, B, train_dropout, magnitude)
            and cpu_call_takes(x, _rows(x)))  # A, B, bias: their dtype and strides are in the key; x's in the plan


def decode(owner, x: torch.Tensor, w, bias, A, B, scaling: float, backend: str, train_dropout: bool = False,
           magnitude=None) -> torch.Tensor | None:
    """``qlora_linear(x, w, bias, A, B, scaling, ...)`` through the plan ``owner`` keeps (a layer,
    or a fused PEFT layer's forward), or None when the plan cannot serve the call.
    ``train_dropout``: the call drops out (training with p > 0)."""
    plan = getattr(owner, "_decode_plan", None)  # None: an owner made without __init__
    if (plan is None or x.dtype != plan.x_dtype or not _call_allows(x, bias, A, B, train_dropout, magnitude)
            or x.shape[-1] != plan.in_features or plan.key != _key(w, bias, A, B, scaling, backend)):
        return None
    M = x.numel() // plan.in_features
    y = x.new_empty(*x.shape[:-1], plan.out_features)
    h = x.new_empty(M, plan.r, dtype=A.dtype)  # x A^T, which the kernel writes (the checked path returns it)
    native.extension().cpu_matmul(plan.weight, x.data_ptr(), M, y.data_ptr(), False, native.cpu_isa(),
                                  native.cpu_threads(), (*plan.lora, h.data_ptr(), 0), **plan.dtypes)
    return y


def remember(owner, x: torch.Tensor, w, bias, A, B, scaling: float, backend: str, train_dropout: bool = False,
             magnitude=None) -> None:
    """After the checked path served the same call (x W^T in x's dtype): keep a plan on ``owner``
    when that path was the native kernel call (fused_forward's conditions) and the plan can serve
    such calls."""
    if not _call_allows(x, bias, A, B, train_dropout, magnitude) or backend not in ("auto", "native"):
        return
    if x.dtype != A.dtype:  # the checked op takes one dtype; a float32 adapter beside a half x: serve_mixed
        return
    if w.device.type != "cpu" or native.unavailable_reason(w.device) is not None:
        return
    if not cpu_call_takes(x, _rows(x), bias, A, B):
        return
    _keep(owner, x, w, bias, A, B, scaling, backend)


def _keep(owner, x, w, bias, A, B, scaling, backend) -> None:
    key = _key(w, bias, A, B, scaling, backend)
    old = getattr(owner, "_decode_plan", None)
    if old is None or old.key != key or old.x_dtype != x.dtype:
        owner._decode_plan = DecodePlan(key, x.dtype, w, bias, A, B, scaling)


def mixed_call_takes(x: torch.Tensor, w, bias, A, B) -> bool:
    """Whether :func:`serve_mixed` takes the call: a half x on the CPU (float16 / bfloat16) with a
    float32 adapter (PEFT's adapters on a 16-bit model) and a bias of x's dtype or float32, every
    shape as the layer's (``A [r, in]``, ``B [out, r]``, ``bias [out]``, ``x [..., in]``), the
    adapter and bias contiguous (x any layout), the rows the one-call kernel takes, no grad
    needed, not under autocast or tracing. Anything else goes to the checked op, which raises
    what is wrong."""
    if not _mode_allows(x, bias, A, B, False, None):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or A.dtype != torch.float32 or B.dtype != torch.float32:
        return False
    if bias is not None and (bias.dtype not in (x.dtype, torch.float32) or bias.shape != (w.shape[0],)
                             or not bias.is_contiguous() or bias.device != x.device):
        return False
    r = A.shape[0]
    if (A.dim() != 2 or B.dim() != 2 or r < 1 or A.shape[1] != w.shape[1] or B.shape != (w.shape[0], r)
            or x.shape[-1] != w.shape[1] or not (A.is_contiguous() and B.is_contiguous())):
        return False
    if A.device != x.device or B.device != x.device or w.device != x.device or x.device.type != "cpu":
        return False
    if native.unavailable_reason(w.device) is not None:
        return False
    return cpu_call_rows(x, _rows(x))  # a strided x is copied by serve_mixed (the same call, the same bits)


def serve_mixed(owner, x: torch.Tensor, w, bias, A, B, scaling: float) -> torch.Tensor:
    """``y = x W^T + bias + scaling (x A^T) B^T`` in x's dtype, in one native call reading the
    float32 adapter (and bias) as they are (computed in float32, y rounded once), for a call
    :func:`mixed_call_takes`; the call is kept on ``owner`` as a plan (:func:`decode` serves the
    next ones). The term in float32, as PEFT computes it (x cast to the adapter's dtype), with no
    cast of the adapter per call."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    y, _ = native.cpu_qlora_forward(x2d, w, bias, A, B, scaling)
    _keep(owner, x, w, bias, A, B, scaling, "auto")
    return y.view(*lead, w.shape[0])
