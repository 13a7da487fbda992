"""QA-LoRA (Xu et al. 2023, arXiv 2309.14717) on an :class:`INT4Weight` base, PEFT's convention.

    x~ = dropout(x)                         [M, in]
    p  = mean_groups(x~) * (in / G)         [M, in / G]   (PEFT: the group mean times in // G)
    y  = x W^T + bias + s * (p A^T) B^T     A [r, in / G], B [out, r]

Since ``p`` is constant over a group's columns, the adapter is the dense update
``dW[o, i] = s * (in / G) / G * (B A)[o, i // G]``: a per-(row, group) constant that
:func:`merge_into` folds into the INT4 weight's zero points, so the merged layer stays 4-bit.

Backward (W frozen): ``dh = s dy B``, ``dB = s dy^T h``, ``dA = dh^T p``,
``dx = dy W + dropout(expand(dh A) * (in / G) / G)``; saved for it: ``p`` and ``h`` (``[M, in / G]``
and ``[M, r]``: 1/G of x and less), never x, never a dropout mask (regenerated from the seed).
The base products go through :class:`lorakern.ops.bases.INT4Base` (native NF4 kernels on the CPU
at small M, row tiles elsewhere); inference on the CPU at small M is one native call, the pooled
adapter term included. Arguments are checked by the op layer's shared checks (lora_A ``[r, in / G]``).

The Triton path is the LoRA kernels' GEMM on W decoded for the call: ``y = x W^T + (s h) B^T +
bias`` with ``h = p A^T`` computed first (``[M, in / G]`` by ``[in / G, r]``: G times fewer FLOPs
than LoRA's h), and ``dx = dy W + D(dh A_rep) (in / G) / G`` with ``A_rep`` A's columns each
repeated G times (``[r, in]``, as a LoRA A): the expansion of the pooling is a rank-r product the
GEMM's K-loop already carries. W is decoded again for the backward, never saved (a whole dense W
held across the step would undo the 4-bit base); dA, dB, dh and dbias are small torch matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import resolve_qalora
from ..dropout import apply_dropout, draw_seed
from ..nf4 import native
from ..ops.bases import INT4Base, cpu_matmul_serves
from ..ops.common import (
    autocast_dtype,
    autocast_to,
    check_adapter_args,
    check_adapter_shapes,
    check_scaling,
    check_seed,
    check_tensor,
    check_x,
    rows,
)
from .format import INT4Weight


def pool(x2d: Tensor, group_size: int) -> Tensor:
    """PEFT's pooled input: ``x [M, in]`` -> the mean of each group of ``group_size`` columns times
    ``in // group_size``, ``[M, in / group_size]``."""
    groups = x2d.shape[1] // group_size
    return x2d.reshape(x2d.shape[0], groups, group_size).mean(-1) * groups


def delta_per_group(lora_A: Tensor, lora_B: Tensor, scaling: float, group_size: int) -> Tensor:
    """The adapter as a dense update, one value per (output row, group): ``[out, in / G]``, in fp32
    (float64 for float64 adapters)."""
    work = torch.float64 if lora_A.dtype == torch.float64 else torch.float32
    groups = lora_A.shape[1]
    return (lora_B.to(work) @ lora_A.to(work)) * (scaling * groups / group_size)


def merge_into(weight: INT4Weight, lora_A: Tensor, lora_B: Tensor, scaling: float) -> INT4Weight:
    """``weight`` with the QA-LoRA adapter folded into its zero points (still INT4, exact to fp32
    rounding of the zeros)."""
    _check_weight(weight)
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check_tensor(name, t)
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    out_features, in_features = weight.shape
    check_adapter_shapes(out_features, in_features, None, lora_A, lora_B, adapter_in=in_features // weight.group_size)
    check_scaling(scaling)
    return weight.merged(delta_per_group(lora_A.detach(), lora_B.detach(), scaling, weight.group_size))


def _check_weight(weight, device=None) -> None:
    if not isinstance(weight, INT4Weight):
        raise TypeError(f"weight: expected an INT4Weight, got {type(weight).__name__}")
    if device is not None and weight.device != device:
        raise ValueError(f"weight: expected device {device} (the device of x), got {weight.device}")


class _QALoRA(torch.autograd.Function):
    """Every path's autograd. ``path``: "triton" (the fused LoRA kernels on W decoded for the call,
    in forward and again in backward; see the module docstring), or the base through INT4Base with
    that backend ("reference": row tiles decoded in torch; "auto": the native kernels where they
    serve) and the adapter term in torch. Saved: the pooled input and h, never x or a mask; dA,
    dB and dbias are small torch matmuls on every path."""

    @staticmethod
    def forward(ctx, x2d, lora_A, lora_B, bias, weight, scaling, dropout_p, seed, path):
        p = pool(apply_dropout(x2d, dropout_p, seed), weight.group_size)
        h = p @ lora_A.t()
        ctx.save_for_backward(p, h, lora_A, lora_B, seed)
        ctx.weight, ctx.scaling, ctx.dropout_p, ctx.path = weight, scaling, dropout_p, path
        ctx.has_bias = bias is not None
        if path == "triton":
            from ..triton.launch import lora_matmul

            y = x2d.new_empty(x2d.shape[0], weight.shape[0])
            lora_matmul(x2d, INT4Base(weight).dequantize(x2d.dtype, "native"), h, lora_B, bias, y, scaling, role="y")
            return y
        y = INT4Base(weight).linear(x2d, bias, path)  # a new tensor: the adapter term is added in place
        return y.add_((h @ lora_B.t()).mul_(scaling))

    @staticmethod
    def backward(ctx, dy):
        p, h, lora_A, lora_B, seed = ctx.saved_tensors
        s, need = ctx.scaling, ctx.needs_input_grad
        dh = (dy @ lora_B) * s
        dA = dh.t() @ p if need[1] else None
        dB = (dy.t() @ h) * s if need[2] else None
        dbias = dy.sum(0) if ctx.has_bias and need[3] else None
        dx = None
        if need[0]:
            G, groups = ctx.weight.group_size, p.shape[1]
            if ctx.path == "triton":  # dY W + D(dh A_rep) (in / G) / G in one GEMM
                from ..triton.launch import lora_matmul

                a_rep = lora_A.repeat_interleave(G, dim=1)  # [r, in]: column i is A's column i // G
                dx = dy.new_empty(dy.shape[0], groups * G)
                lora_matmul(dy, INT4Base(ctx.weight).dequantize(dy.dtype, "native").t(), dh.float() * (groups / G),
                            a_rep.t(), None, dx, 1.0, dropout_p=ctx.dropout_p, seed=seed, role="dx")
            else:
                dp = (dh @ lora_A) * (groups / G)  # d(mean * groups) / dx = groups / G
                dxd = dp[:, :, None].expand(-1, -1, G).reshape(dy.shape[0], groups * G)
                dx = INT4Base(ctx.weight).grad_input(dy, ctx.path).add_(apply_dropout(dxd, ctx.dropout_p, seed))
        return dx, dA, dB, dbias, None, None, None, None, None


def qalora_linear(x: Tensor, weight: INT4Weight, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                  scaling: float, dropout_p: float = 0.0, training: bool = False,
                  seed: Tensor | None = None, backend: str = "auto") -> Tensor:
    """QA-LoRA linear on ``x [..., in]`` over the INT4 ``weight`` (see the module docstring):
    ``[..., out]``, in x's dtype. ``seed``: the dropout seed (drawn from torch's generator when None
    and dropout is active). ``backend``: "reference" (pure torch), "native" (lorakern._C for the
    base: the CPU kernels at M <= 16, the CUDA GEMV), "triton" (the fused LoRA kernels on the
    decoded W), or "auto": Triton for CUDA inputs of more than 16 rows, else native where built,
    else the reference (with a one-time warning)."""
    check_x(x)
    _check_weight(weight, x.device)
    out_features, in_features = weight.shape
    cast = autocast_dtype(x.device.type)
    check_adapter_args(x, out_features, in_features, bias, lora_A, lora_B, scaling, dropout_p, cast is not None,
                       adapter_in=in_features // weight.group_size)
    if cast is not None:  # as nn.Linear under autocast: inputs in the autocast dtype
        x, bias, lora_A, lora_B = autocast_to(cast, x, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    check_seed(seed, p, x.device)
    seed = torch.zeros((), dtype=torch.int64, device=x.device) if seed is None else seed
    x2d, scaling = rows(x), float(scaling)
    chosen = resolve_qalora(backend, x2d, lora_A.shape[0])
    if (chosen == "native" and p == 0.0 and _inference(x2d, lora_A, lora_B, bias)
            and _native_serves(x2d, weight, lora_A, lora_B, bias)):
        y, _ = native.cpu_qlora_forward(x2d.contiguous(), weight.native_view(),
                                        None if bias is None else bias.contiguous(), lora_A.contiguous(),
                                        lora_B.contiguous(), scaling, pool=weight.group_size)
    else:
        path = {"native": "auto"}.get(chosen, chosen)
        y = _QALoRA.apply(x2d, lora_A, lora_B, bias, weight, scaling, p, seed, path)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _inference(*tensors) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _native_serves(x2d, weight, *others) -> bool:
    """Decode and serving: the whole layer (base, zero points, pooled adapter term, bias) in one
    native call, no torch op around it (on 2 cores a torch op between native calls cost the next
    call ~2 ms at M = 16: the two thread pools compete for the cores). Above 16 rows where the
    native kernel serves the base (:func:`~lorakern.ops.bases.cpu_matmul_serves`)."""
    rows_served = INT4Base(weight).native_serves(x2d) or (x2d.shape[0] > 0 and cpu_matmul_serves(x2d, False))
    return (x2d.device.type == "cpu" and rows_served
            and all(t is None or (t.dtype == x2d.dtype and t.device.type == "cpu") for t in others))


def qalora_linear_reference(x, weight_dense, bias, lora_A, lora_B, scaling: float, group_size: int,
                            dropout_p: float = 0.0, seed=None):
    """The same layer with plain torch autograd on a dense W: the float64 oracle of the tests."""
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d @ weight_dense.t() + (0 if bias is None else bias)
    y = y + (pool(apply_dropout(x2d, dropout_p, seed), group_size) @ lora_A.t() @ lora_B.t()) * scaling
    return y.reshape(*x.shape[:-1], weight_dense.shape[0])
