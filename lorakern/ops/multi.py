"""Several adapters over one base in one call: each row of x names its adapter (a mixed batch for
serving, or several adapters trained in one batch), on a dense or NF4 base.

    y_m = x_m W^T + bias + s_a * dropout_a(x_m) A_a^T B_a^T,   a = adapter_index[m]  (-1: the base only)

Three paths. "triton" (CUDA, or the interpreter) runs the kernels of lorakern/triton/multi.py on the
adapters stacked ``[n, r_max, ...]`` (a sequence of adapters is stacked per call, a copy of their n
* r_max * (in + out) elements; pass stacked tensors to avoid it); an NF4 base is decoded to x's
dtype into a temporary for them, in forward and again in backward (as the QLoRA op's "triton": never
kept between the two; "auto" takes it for CUDA inputs above SMALL_M rows, where the GEMM dominates,
and the NF4 kernels below). The pure-torch path (every device, any base; autograd through torch):
the base once for the whole batch (its small-M kernels, its tiled decode for an NF4 base), then per
adapter its rows gathered, two skinny matmuls and a scatter-add into y; dA_a and dB_a come from a's
rows only (zeros, not None, for an adapter without rows). "native" (lorakern._C; inference: no
grad, no dropout, float32): on a dense base, torch's product for the base and one CPU call adding
every row's adapter term (rows grouped by adapter, each adapter's A and B read in place, once per
block); on an NF4 base, its native decode kernels (at M <= 16 with each row's term inside the
decode; above it, on the CPU, the dense base's call after the decode). Each adapter keeps its own
rank, scaling and dropout. Dropout draws one seed per call; the mask of element (m, k) is the one
the single-adapter op draws for that seed and element index ``m * in + k``, with adapter a(m)'s
probability: a batch whose rows are all one adapter's gets exactly the single-adapter op's masks.

Cost against one adapter on the same rows: the base product is shared, each adapter with rows adds
``2 * rows_a * r_a * (in + out)`` FLOPs and a gather of its rows of x (rows_a * in elements, as
PEFT's mixed batch); an adapter without rows costs a few empty ops (a few us) and no FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..backend import FLOAT_DTYPES, SMALL_M, resolve_multi, resolve_qlora
from ..dropout import apply_dropout, draw_seed
from ..nf4 import native
from ..nf4.format import NF4Weight
from .bases import DenseBase, NF4Base
from .common import autocast_dtype, autocast_to, check_adapter_args, check_tensor, check_x, is_real, rows
from .lora import check_dense_weight
from .nf4 import check_weight


def _kernels():
    """lorakern.triton.multi, imported on first use (triton is optional for the reference path)."""
    from ..triton import multi

    return multi


class _BaseLinear(torch.autograd.Function):
    """``x W^T + bias`` through a base weight (dense or NF4) with its own backward ``dY W``: the NF4
    kernels have no autograd of their own, and W never gets a grad."""

    @staticmethod
    def forward(ctx, x, bias, base, backend):
        ctx.base, ctx.backend, ctx.has_bias = base, backend, bias is not None
        return base.linear(x, bias, backend)

    @staticmethod
    def backward(ctx, dy):
        dx = ctx.base.grad_input(dy, ctx.backend) if ctx.needs_input_grad[0] else None
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, dbias, None, None


def _per_adapter(name: str, value, n: int) -> list[float]:
    """A float for every adapter, from one value or a sequence of n."""
    if type(value) is float or type(value) is int:  # the common case, first: this runs on every call
        return [float(value)] * n
    values = [value] * n if is_real(value) else list(value) if isinstance(value, Sequence) else None
    if values is None or len(values) != n or not all(is_real(v) for v in values):
        raise ValueError(f"{name}: expected a number or a sequence of {n} numbers (one per adapter), got {value!r}")
    return [float(v) for v in values]


def _check_adapters(x, weight, bias, lora_A, lora_B, scalings, ps, autocasting: bool, nf4: bool) -> None:
    """Every adapter through :func:`check_adapter_args`, each error naming its adapter. Adapter 0
    takes the whole check (x, bias and the base with it); another takes a quick test of what can
    differ between adapters (shapes, dtypes as adapter 0's, device, scaling, dropout_p), enough for
    the whole check to pass, and the whole check only when that fails, for its message: the whole
    check costs ~9 us an adapter, 72 us a call at 8 adapters, against ~60 us for a small native call."""
    out_features, in_features = weight.shape
    device = x.device
    for a, (A, B) in enumerate(zip(lora_A, lora_B)):
        if a > 0 and isinstance(A, Tensor) and isinstance(B, Tensor) and A.dim() == 2 and A.shape[1] == in_features \
                and B.shape == (out_features, A.shape[0]) and A.shape[0] >= 1 and A.dtype == lora_A[0].dtype \
                and B.dtype == lora_B[0].dtype and A.device == device and B.device == device \
                and 0.0 <= ps[a] < 1.0 and math.isfinite(scalings[a]):
            continue
        try:
            check_adapter_args(x, out_features, in_features, bias, A, B, scalings[a], ps[a], autocasting,
                               base=None if nf4 else {"weight": weight}, dtypes=FLOAT_DTYPES if nf4 else None)
        except (TypeError, ValueError) as e:
            raise type(e)(f"adapter {a}: {e}") from None


def check_index(adapter_index, x: Tensor, n: int) -> Tensor:
    """``adapter_index`` [M] int64 on x's device: one entry per row of x (x's leading shape, or flat)."""
    check_tensor("adapter_index", adapter_index)
    lead = tuple(x.shape[:-1])
    if adapter_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"adapter_index: expected an integer tensor, got {adapter_index.dtype}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index: expected device {x.device} (the device of x), got {adapter_index.device}")
    if tuple(adapter_index.shape) not in (lead, (math.prod(lead),)):
        raise ValueError(f"adapter_index: expected shape {list(lead)} (x's leading dims) or [{math.prod(lead)}], "
                         f"got {tuple(adapter_index.shape)}")
    index = adapter_index if adapter_index.dim() == 1 else adapter_index.reshape(-1)
    index = index if index.dtype == torch.int64 else index.to(torch.int64)  # each op ~2 us a call saved
    if index.numel():
        if index.device.type == "cpu" and index.numel() <= 256:  # serving: a few rows (~2 us against ~8)
            values = index.tolist()
            low, high = min(values), max(values)
        else:
            low, high = (int(v) for v in torch.aminmax(index))
        if low < -1 or high >= n:
            raise ValueError(f"adapter_index: expected values in [-1, {n - 1}] (-1: no adapter), got [{low}, {high}]")
    return index


def _stacked_views(lora_A, lora_B, ranks):
    """Lists of per-adapter ``A_a [r_a, in]``, ``B_a [out, r_a]`` (views) from stacked ``lora_A
    [n, R, in]`` and ``lora_B [n, out, R]``, with ``ranks`` (default R for every adapter)."""
    if not isinstance(lora_B, Tensor):
        raise TypeError(f"lora_B: expected a stacked tensor [n, out, r_max] as lora_A is one, got "
                        f"{type(lora_B).__name__}")
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"lora_A, lora_B: expected stacked [n, r_max, in] and [n, out, r_max], got shapes "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    n, r_max = lora_A.shape[:2]
    if n < 1 or r_max < 1 or lora_B.shape[0] != n or lora_B.shape[2] != r_max:
        raise ValueError(f"lora_B: expected shape [{n}, out, {r_max}] (lora_A is {tuple(lora_A.shape)}), got "
                         f"{tuple(lora_B.shape)}")
    ranks = [r_max] * n if ranks is None else list(ranks)
    if len(ranks) != n or not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= r_max
                                  for r in ranks):
        raise ValueError(f"ranks: expected {n} ints in [1, {r_max}] (r_max = lora_A.shape[1]), got {ranks!r}")
    return [lora_A[a, :r] for a, r in enumerate(ranks)], [lora_B[a, :, :r] for a, r in enumerate(ranks)], ranks


def stack_ranks(tensors: list[Tensor], dim: int, r_max: int) -> Tensor:
    """Adapters' tensors zero-padded along ``dim`` (their rank) to r_max and stacked (autograd
    flows back to each): a copy of n * r_max * (in + out) elements, the adapters' size."""
    pad = [(0, 0, 0, r_max - t.shape[0]) if dim == 0 else (0, r_max - t.shape[1]) for t in tensors]
    return torch.stack([torch.nn.functional.pad(t, p) if p[-1] else t for t, p in zip(tensors, pad)])


def multi_lora_linear(
    x: Tensor, weight, bias: Tensor | None, lora_A, lora_B, scaling, adapter_index: Tensor, dropout_p=0.0,
    training: bool = True, backend: str = "auto", ranks=None,
) -> Tensor:
    """LoRA with a different adapter per row of ``x [..., in]`` -> ``[..., out]``.

    Args:
        weight: the frozen base, ``[out, in]`` dense or an :class:`lorakern.NF4Weight`.
        lora_A, lora_B: n adapters, either sequences ``lora_A[a] [r_a, in]``, ``lora_B[a] [out, r_a]``
            (ranks may differ), or stacked tensors ``[n, r_max, in]`` and ``[n, out, r_max]`` whose
            adapter a uses its first ``ranks[a]`` rank columns (default: all r_max).
        scaling, dropout_p: one number for all adapters, or one per adapter.
        adapter_index: integer, x's leading shape (or flat ``[M]``): the adapter of each row, -1 for
            the base alone.
        backend: "auto", "reference" (pure torch), "triton" (the fused kernels, on CUDA or in the
            interpreter; "auto" takes them for CUDA tensors, on an NF4 base above 16 rows), or
            "native" (lorakern._C: an NF4 base's product; on a dense base, the adapter terms of an
            inference call on the CPU, which "auto" takes there when it can serve the call).

    Returns y with grads for x, bias and every adapter's A and B (from its own rows only; for
    stacked adapters, zeros beyond each adapter's rank).
    """
    check_x(x)
    stacks = None
    if isinstance(lora_A, Tensor):
        stacks = (lora_A, lora_B)
        lora_A, lora_B, ranks = _stacked_views(lora_A, lora_B, ranks)
    elif ranks is not None:
        raise ValueError("ranks: only with stacked lora_A [n, r_max, in] (a sequence's ranks are its shapes)")
    if isinstance(lora_B, Tensor) or len(lora_A) != len(lora_B) or not lora_A:
        raise ValueError("lora_A, lora_B: expected two sequences of the same number (>= 1) of adapter tensors, "
                         "or two stacked 3-D tensors")
    n = len(lora_A)
    nf4 = isinstance(weight, NF4Weight)
    if nf4:
        check_weight(weight, x.device)
    else:
        check_dense_weight(weight)
    out_features, in_features = weight.shape
    scalings, ps = _per_adapter("scaling", scaling, n), _per_adapter("dropout_p", dropout_p, n)
    cast = autocast_dtype(x.device.type)
    _check_adapters(x, weight, bias, lora_A, lora_B, scalings, ps, cast is not None, nf4)
    index = check_index(adapter_index, x, n)
    ranks = [A.shape[0] for A in lora_A] if ranks is None else ranks
    ps = [p if training else 0.0 for p in ps]
    if nf4:
        chosen = resolve_qlora(backend, rows(x), max(ranks))
    else:
        chosen = resolve_multi(backend, rows(x), max(ranks),
                               lambda: _native_terms_reason(rows(x), bias, lora_A, lora_B, ps, cast or x.dtype))
    if cast is not None:
        x, bias = autocast_to(cast, x, bias)
        lora_A, lora_B = autocast_to(cast, *lora_A), autocast_to(cast, *lora_B)
        stacks = None if stacks is None else autocast_to(cast, *stacks)
        weight = weight if nf4 else weight.to(cast)
    seed = draw_seed(x.device) if any(p > 0.0 for p in ps) else None
    x2d = rows(x)
    base = NF4Base(weight) if nf4 else DenseBase(weight)
    if chosen == "triton":
        if stacks is None:
            r_max = max(ranks)
            stacks = (stack_ranks(lora_A, 0, r_max), stack_ranks(lora_B, 1, r_max))
        adapters = _kernels().Adapters(ranks, scalings, ps, x.device)
        y = _MultiTriton.apply(x2d, bias, *stacks, base, index.to(torch.int32), adapters, seed)
    elif nf4 and chosen == "native" and _native_serves(x2d, bias, lora_A, lora_B, ps):
        serve = native.cuda_multi_forward if x2d.device.type == "cuda" else native.cpu_multi_forward
        y = serve(x2d, weight, bias, lora_A, lora_B, scalings, index)
    else:
        y = _BaseLinear.apply(x2d, bias, base, chosen)
        # "native" on a dense base means these terms (resolve checked they serve the call); on an
        # NF4 base above SMALL_M rows they follow its tiled decode when they can serve the call.
        if chosen == "native" and (not nf4 or _native_terms_reason(x2d, bias, lora_A, lora_B, ps, x2d.dtype) is None):
            y = native.cpu_lora_terms(y, x2d, lora_A, lora_B, scalings, index)
        else:
            y = _add_adapters(y, x2d, lora_A, lora_B, scalings, ps, seed, index)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def _native_terms_reason(x2d, bias, lora_A, lora_B, ps, dtype) -> str | None:
    """Why the CPU kernel that adds every row's adapter term after a dense base's product cannot
    serve this call (None: it can). It serves inference: no grad, no dropout, float32, x and the
    adapters with unit column stride (their rows any distance apart: stacked views). One call
    for all adapters, where the torch path runs ~6 ops per adapter (4096 x 4096, r = 16, 8 adapters
    on 2 Zen 4 cores: ~0.5 ms for the terms against ~1.5 ms at M = 64)."""
    reason = native.unavailable_reason(x2d.device) or _inference_reason((x2d, bias, *lora_A, *lora_B), ps)
    if reason is not None:
        return reason
    if x2d.device.type != "cpu":
        return f"x is on {x2d.device.type} (the native adapter terms of a dense base run on the CPU)"
    if dtype != torch.float32:
        return f"x is {dtype} (the native adapter terms compute in float32)"
    strided = native.strided_columns(x2d, lora_A, lora_B)
    if strided is not None:
        return f"{strided}'s columns are strided (the native adapter terms read rows in place)"
    return None


def _inference_reason(tensors, ps) -> str | None:
    """Why a native serving path (no backward, no dropout) cannot take this call, or None."""
    if any(p > 0.0 for p in ps):
        return "dropout in training (the native adapter terms serve inference)"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "a tensor requires grad (the native adapter terms have no backward)"
    return None


def _native_serves(x2d, bias, lora_A, lora_B, ps) -> bool:
    """Serving at small M (no grad, no dropout, contiguous): the native NF4 decode kernel adds each
    row's adapter term as it writes the row, in one call (the adapters are read in place); on the
    CPU in float32, on CUDA in x's dtype (the GEMV, after one small kernel for h). Otherwise each
    adapter is a few torch ops after the base: on 2 cores those ops' threads slow the next native
    call by ~1 ms (4096 x 4096, M = 8: 4.6 ms for 8 adapters against 2.1 ms for one adapter's
    fused decode), and on a GPU the loop over adapters syncs with the host (the rows per adapter)."""
    tensors = (x2d, bias, *lora_A, *lora_B)
    if not 0 < x2d.shape[0] <= SMALL_M or _inference_reason(tensors, ps) is not None:
        return False
    # Every tensor here has x's dtype and device (checked beside each adapter, or cast by autocast).
    dtype = torch.float32 if x2d.device.type == "cpu" else x2d.dtype
    if x2d.device.type not in ("cpu", "cuda") or x2d.dtype != dtype or dtype not in FLOAT_DTYPES:
        return False
    return all(t is None or t.is_contiguous() for t in tensors)


class _MultiTriton(torch.autograd.Function):
    """The Triton kernels (lorakern/triton/multi.py) on stacked adapters over a base's W in x's
    dtype (an NF4 base decoded for the forward and again for the backward, never saved); W never
    gets a grad."""

    @staticmethod
    def forward(ctx, x2d, bias, lora_A, lora_B, base, index, adapters, seed):
        y, h = _kernels().forward(x2d, base.dequantize(x2d.dtype, "native"), bias, lora_A, lora_B, index, adapters,
                                  seed)
        ctx.save_for_backward(x2d, lora_A, lora_B, h, index, seed)
        ctx.base, ctx.adapters = base, adapters
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, lora_A, lora_B, h, index, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        weight = ctx.base.dequantize(dy.dtype, "native")
        dx, dA, dB, dbias = _kernels().backward(dy, x2d, weight, lora_A, lora_B, h, index, ctx.adapters, seed,
                                                needs_dx=need[0], needs_dlora=need[2] or need[3], needs_dbias=need[1])
        return dx, dbias, dA, dB, None, None, None, None


def _add_adapters(y, x2d, lora_A, lora_B, scalings, ps, seed, index):
    """``y`` with each adapter's term added on its rows, in place (autograd tracks it)."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index + 1, minlength=len(lora_A) + 1).tolist()  # bin 0: rows with -1
    start = counts[0]
    for a, count in enumerate(counts[1:]):
        # An adapter without rows runs on none (a few us): its dA and dB are then zeros, not None.
        row_ids = order[start:start + count]
        start += count
        xa = apply_dropout(x2d.index_select(0, row_ids), ps[a], seed, row_ids)
        term = ((xa @ lora_A[a].t()) @ lora_B[a].t()) * scalings[a]
        y.index_add_(0, row_ids, term.to(y.dtype))
    return y
