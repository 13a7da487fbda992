"""Pure-torch LoRA linear: the definition every kernel is tested against, and the CPU path.

Shapes (2-D, after flattening leading dims of x):
    x [M, K]   weight W [N, K] (frozen)   bias [N] or None
    lora_A [r, K]   lora_B [N, r]   h = dropout(x) A^T  [M, r]   y [M, N]

    y = x W^T + bias + s * h B^T

Computed in the inputs' dtype, in the same order PEFT's LoRA ``Linear`` uses (base output, then
``lora_B(lora_A(dropout(x))) * s`` added), so on the same dtype it rounds like PEFT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import apply_dropout


def lora_forward_reference(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """Forward of the LoRA linear. Returns ``(y [M, N], h [M, r])``; ``h`` is saved for backward."""
    h = apply_dropout(x, dropout_p, seed) @ lora_A.t()
    y = F.linear(x, weight, bias)
    y = y + (h @ lora_B.t()) * scaling
    return y, h


def lora_backward_reference(
    dy, x, weight, lora_A, lora_B, h, scaling: float, dropout_p: float, seed,
    needs_dx: bool = True, needs_dlora: bool = True, needs_dbias: bool = True, dx_base=None,
):
    """Gradients of :func:`lora_forward_reference` (W frozen: never a grad for it).

    With ``D`` the dropout operator (mask / (1-p), diagonal), ``h = D(x) A^T``, ``y = x W^T + s h B^T``:

        dh     = s * dy B                     [M, r]
        dB     = s * dy^T h                   [N, r]
        dA     = dh^T D(x)                    [r, K]
        dx     = dy W + D(dh A)               [M, K]   (D is its own transpose: elementwise)
        dbias  = sum_m dy                     [N]

    Returns ``(dx, dA, dB, dbias)``; an entry not asked for is an empty tensor. ``dx_base``: ``dy W``
    when the caller computed it (a quantized base; ``weight`` is then None).
    """
    dh = (dy @ lora_B) * scaling
    dx, dA, dB, dbias = (dy.new_empty(0) for _ in range(4))  # distinct: op outputs may not alias
    if needs_dlora:
        dB = ((dy.t() @ h) * scaling).to(lora_B.dtype)
        dA = (dh.t() @ apply_dropout(x, dropout_p, seed)).to(lora_A.dtype)
    if needs_dx:
        dx = (dy @ weight if dx_base is None else dx_base) + apply_dropout(dh @ lora_A, dropout_p, seed)
    if needs_dbias:
        dbias = dy.sum(0)
    return dx, dA, dB, dbias


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=None):
    """The whole layer on ``x [..., K]`` with plain torch autograd: the float64 oracle of the tests."""
    x2d = x.reshape(-1, x.shape[-1])
    y, _ = lora_forward_reference(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def dora_weight_norm_reference(weight, lora_A, lora_B, scaling: float):
    """DoRA's weight norm by its definition: ``||W + s B A||`` over each output row, ``[N]``, detached."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float = 0.0,
                          seed=None):
    """DoRA on ``x [..., K]`` with plain torch autograd, PEFT's ``DoraLinearVariant`` written out:
    ``y = x W^T + bias + (g - 1) (x~ W^T) + g s (x~ A^T) B^T``, ``g = m / ||W + s B A||_row`` with
    the norm detached, ``x~ = dropout(x)`` (``x`` itself without dropout, where this is
    ``g (x W^T + s x A^T B^T) + bias``). The float64 oracle of the DoRA tests."""
    x2d = x.reshape(-1, x.shape[-1])
    xd = apply_dropout(x2d, dropout_p, seed)
    g = magnitude / dora_weight_norm_reference(weight, lora_A, lora_B, scaling)
    y = F.linear(x2d, weight, bias) + (g - 1) * F.linear(xd, weight) + g * ((xd @ lora_A.t()) @ lora_B.t()) * scaling
    return y.reshape(*x.shape[:-1], weight.shape[0])


def multi_lora_linear_reference(x, weight, bias, lora_A, lora_B, scalings, adapter_index, dropout_ps=None,
                                seed=None):
    """Several adapters, one per row of ``x [..., K]`` (``adapter_index``, -1: none), by the definition:
    each row's own adapter term, its dropout mask the single-adapter mask of the whole input for
    ``seed``. The float64 oracle of the multi-adapter tests."""
    x2d = x.reshape(-1, x.shape[-1])
    index = adapter_index.reshape(-1)
    y = F.linear(x2d, weight, bias)
    rows = []
    for m in range(x2d.shape[0]):
        a = int(index[m])
        if a < 0:
            rows.append(y[m])
            continue
        p = 0.0 if dropout_ps is None else dropout_ps[a]
        xm = apply_dropout(x2d, p, seed)[m] if p > 0 else x2d[m]
        rows.append(y[m] + scalings[a] * ((xm @ lora_A[a].t()) @ lora_B[a].t()))
    out = torch.stack(rows) if rows else y
    return out.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["dora_linear_reference", "dora_weight_norm_reference", "lora_backward_reference", "lora_forward_reference",
           "lora_linear_reference", "multi_lora_linear_reference"]
