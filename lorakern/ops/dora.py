"""DoRA (weight-decomposed LoRA) as a variant of the LoRA bodies: the weight norm, its caches, and
the forward / backward on any base (dense or NF4): in plain torch, or for "triton" by the launch
sequences of :mod:`lorakern.triton.lora` on the dense (or decoded) W. The float64 definition is
:func:`lorakern.reference.dora_linear_reference`.

PEFT's ``DoraLinearVariant`` is the contract. With ``g = m / n`` (per output row j),
``n_j = ||W_j + s (B A)_j||`` detached (no gradient flows through the norm: DoRA paper, 4.3),
``x~ = dropout(x)``, ``h = x~ A^T``:

    y = x W^T + bias + (g - 1) * (x~ W^T) + g * s h B^T

Without dropout (or in eval) ``x~ = x`` and this is ``y = g * (x W^T + s h B^T) + bias``; with
dropout PEFT computes the base product a second time, on ``x~``, and so does this. Naming
``u = x~ W^T`` and ``z = u + s h B^T`` [M, out]: ``y = x W^T + bias - u + g * z``.

The norm never needs the dense ``B A`` [out, in]:

    n_j^2 = ||W_j||^2 + 2 s B_j . (A W^T)^T_j + s^2 B_j (A A^T) B_j^T

``||W_j||`` is cached per base weight (constant while W is frozen); ``A W^T`` [r, out] is one more
pass over W, taken in the same matmul as ``x~ W^T`` at small M (rows [x~; A] together: memory-bound,
so r more rows cost little on a dense base); the rest is O(out * r^2 + in * r^2). The whole norm is
cached per (W, A, B, s) while none of them changes (eval, gradient accumulation): W checked by its
tensors' identities and version counters, A and B by their values (copies kept with the norm).

Gradients (n constant):

    dz     = g * dy                                   [M, out]
    dm     = sum_m (dy * z) / n                       [out]
    dh     = s dz B,  dB = s dz^T h,  dA = dh^T x~    (LoRA's, with dz for dy)
    dx     = dz W + D(dh A)                           (no dropout)
    dx     = dy W + D((g - 1) dy W + dh A)            (dropout; D regenerated from the seed)
    dbias  = sum_m dy

Saved for backward, beyond LoRA's x and h [M, r]: z [M, out] in x's dtype (for dm) and n [out]
fp32. PEFT's autograd keeps x, dropout(x), lora_A(x) [M, r], the base result and the LoRA result
(two [M, out] tensors), and their products with the scale.

A zero row ``W_j + s (B A)_j = 0`` makes n_j = 0 and g_j = m_j / 0 (inf or nan): output column j
and the grads it touches are nan, as in PEFT, which divides by the same zero.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import TensorWeakRef, WeakTensorKeyDictionary

from ..dropout import apply_dropout
from ..reference import lora_backward_reference
from ..stamp import stamp as tensor_stamp
from .common import Adapter, triton_ops

# The norms cached so far: base weight tensor -> (stamp, ||W_j|| [out] fp32), and lora_A ->
# (stamp of W and s, copies of A and B, n [out] fp32). Weak keys: an entry goes with its tensor.
_ROW_NORMS = WeakTensorKeyDictionary()
_NORMS = WeakTensorKeyDictionary()


def _lookup(cache, key: Tensor, stamp, others: tuple):
    hit = cache.get(key)
    if hit is None or stamp is None or hit[0] != stamp or len(hit[1]) != len(others):
        return None
    if any(ref() is not t for ref, t in zip(hit[1], others)):
        return None
    return hit[2]


def _store(cache, key: Tensor, stamp, others: tuple, value: Tensor) -> None:
    if stamp is not None:
        cache[key] = (stamp, tuple(TensorWeakRef(t) for t in others), value)


def row_norms(base) -> Tensor:
    """``||W_j||`` [out] fp32 of a base weight, cached while its tensors are unchanged."""
    tensors = base.tensors()
    stamp = tensor_stamp(*tensors)
    cached = _lookup(_ROW_NORMS, tensors[0], stamp, tensors[1:])
    if cached is None:
        cached = base.row_norms()
        _store(_ROW_NORMS, tensors[0], stamp, tensors[1:], cached)
    return cached


def norm_from(wn: Tensor, aw: Tensor, adapter: Adapter) -> Tensor:
    """``n = ||W + s B A||_row`` [out] (fp32, fp64 for float64) from ``wn = ||W_j||`` and ``aw = A W^T`` [r, out]."""
    dtype = wn.dtype
    A, B, s = adapter.lora_A.to(dtype), adapter.lora_B.to(dtype), adapter.scaling
    cross = (B * aw.to(dtype).t()).sum(1)                    # B_j . (W A^T)_j
    quad = ((B @ (A @ A.t())) * B).sum(1)                    # B_j (A A^T) B_j^T
    return (wn * wn + (2.0 * s) * cross + (s * s) * quad).clamp_min_(0.0).sqrt_()


def cached_norm(base, adapter: Adapter) -> tuple[Tensor | None, tuple]:
    """``(n or None, key)``: the norm cached for this base and adapter, and the key to store one.
    The base by its tensors' identities and version counters (it is frozen); the adapter by its
    values, compared with copies kept beside the norm: PEFT writes adapters through
    ``tensor.data`` (``hotswap_adapter``), which leaves the version counter alone, and a fused PEFT
    layer on a 16-bit model refreshes its adapters' casts in place on every call."""
    A, B = adapter.lora_A, adapter.lora_B
    tensors = base.tensors()
    stamp = tensor_stamp(*tensors)
    key = (None if stamp is None else (*stamp, float(adapter.scaling)), (*tensors, B))
    hit = _lookup(_NORMS, A, *key)
    if hit is None:
        return None, key
    kept_A, kept_B, norm = hit
    same = (kept_A.shape == A.shape and kept_A.dtype == A.dtype and kept_B.shape == B.shape
            and kept_B.dtype == B.dtype and torch.equal(kept_A, A.detach()) and torch.equal(kept_B, B.detach()))
    return (norm if same else None), key


def store_norm(adapter: Adapter, key: tuple, norm: Tensor) -> None:
    kept = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone(), norm)
    _store(_NORMS, adapter.lora_A, *key, kept)


def weight_norm(base, adapter: Adapter, backend: str, base_dtype=None, weight: Tensor | None = None) -> Tensor:
    """``||W + s B A||_row`` [out] fp32 (detached), cached (see the module docstring). ``weight``:
    the dense W the Triton kernels read, where "triton" already has it."""
    norm, key = cached_norm(base, adapter)
    if norm is None:
        norm = _new_norm(base, adapter, key, backend, base_dtype, weight)
    return norm


def _new_norm(base, adapter: Adapter, key: tuple, backend: str, base_dtype=None, weight: Tensor | None = None,
              aw: Tensor | None = None) -> Tensor:
    """The norm computed (``aw = A W^T`` [r, out] when the caller has it) and cached under ``key``."""
    A, B = adapter.lora_A.detach(), adapter.lora_B.detach()
    if aw is None and not B.any():  # B = 0 (PEFT's init): n = ||W||, exactly the norm PEFT gave m
        norm = row_norms(base).clone()
    else:
        if aw is None and backend == "triton":
            aw = triton_ops().weight_a(base.dequantize(A.dtype, backend) if weight is None else weight, A).t()
        elif aw is None:
            aw = base.linear(A, None, backend, base_dtype)
        norm = norm_from(row_norms(base), aw, adapter._replace(lora_A=A, lora_B=B))
    store_norm(adapter, key, norm)
    return norm


def scale(adapter: Adapter, norm: Tensor) -> Tensor:
    """``g = m / n`` [out] in the norm's dtype."""
    return adapter.magnitude.detach().to(norm.dtype) / norm


def forward(x: Tensor, base, bias: Tensor | None, adapter: Adapter, backend: str, base_dtype=None,
            keep_z: bool = True):
    """``x [M, in]`` -> ``(y [M, out], h [M, r], z [M, out] (empty unless keep_z), n [out] fp32)``."""
    A, B, s, p, seed, _ = adapter
    if backend == "triton":
        weight = base.dequantize(x.dtype, backend)
        norm = weight_norm(base, adapter, backend, weight=weight)
        y, h, z = triton_ops().dora_forward(x, weight, bias, A, B, s, p, seed, scale(adapter, norm), keep_z)
        return y, h, x.new_empty(0) if z is None else z, norm
    M = x.shape[0]
    xd = apply_dropout(x, p, seed)
    h = xd @ A.t()
    # PEFT's order, so that a fresh adapter (B = 0, m = n) gives the base layer's output bit for
    # bit: result = base(x) + bias, u = x~ W^T (result - bias without dropout), then
    # y = result + ((g - 1) u + g s h B^T). base_dtype (bitsandbytes' compute_dtype) other than
    # x's: result from the base in base_dtype, u with dropout from W in x's dtype, as PEFT's DoRA.
    mixed = base_dtype is not None and base_dtype != x.dtype
    norm, key = cached_norm(base, adapter)
    stacked = norm is None and not mixed and M + A.shape[0] <= base.shared_rows and bool(B.detach().any())
    if stacked:  # one pass over W for both products: [x~; A] W^T (see the module docstring)
        both = base.linear(torch.cat([xd, A.detach()]), None, backend)
        u = both[:M]
        norm = _new_norm(base, adapter, key, backend, aw=both[M:])
    elif norm is None:
        norm = _new_norm(base, adapter, key, backend)
    if p == 0.0:
        if stacked:
            result = u if bias is None else u + bias
        else:
            result = base.linear(x, bias, backend, base_dtype)
            u = result if bias is None else result - bias
    else:
        result = base.linear(x, bias, backend, base_dtype)
        if not stacked:
            u = base.linear(xd, None, backend)
    g = scale(adapter, norm)  # fp32: the per-row scale is applied in fp32, as PEFT's fp32 magnitude does
    lora = (h @ B.t()).mul_(s)
    y = (result + ((g - 1.0) * u + g * lora)).to(x.dtype)
    return y, h, u + lora if keep_z else x.new_empty(0), norm


def backward(dy: Tensor, x: Tensor, base, adapter: Adapter, h: Tensor, z: Tensor, norm: Tensor, needs_dx: bool,
             needs_dlora: bool, needs_dbias: bool, backend: str, base_dtype=None):
    """``(dx, dA, dB, dbias, dm)`` of :func:`forward` (one not asked for is empty); W frozen."""
    A, B, s, p, seed, m = adapter
    g32 = scale(adapter, norm)
    if backend == "triton":
        dx, dA, dB, dbias, dm = triton_ops().dora_backward(dy, x, base.dequantize(dy.dtype, backend), A, B, h, z,
                                                           norm, g32, s, p, seed, needs_dx, needs_dlora, needs_dbias)
        return dx, dA, dB, dbias, dm.to(m.dtype)
    g = g32.to(dy.dtype)
    dz = (dy * g32).to(dy.dtype)
    dx_base = None
    if needs_dx:
        if p == 0.0:
            dx_base = base.grad_input(dz, backend, base_dtype)
        else:
            dx_base = base.grad_input(dy, backend, base_dtype).add_(
                apply_dropout(base.grad_input(dz - dy, backend), p, seed))  # u's grad: in x's dtype
    # LoRA's grads with dz for dy: dh = s dz B = s dy (g B), dB = s dz^T h = g * (s dy^T h).
    dx, dA, dB, dbias = lora_backward_reference(dy, x, None, A, B * g[:, None], h, s, p, seed, needs_dx,
                                                needs_dlora, needs_dbias, dx_base)
    dm = dy.new_empty(0)
    if needs_dlora:
        dB = (dB * g[:, None]).to(B.dtype)
        dm = ((dy * z).sum(0, dtype=norm.dtype) / norm).to(m.dtype)
    return dx, dA, dB, dbias, dm
