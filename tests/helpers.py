"""Shared test helpers: random LoRA inputs and error checks against a float64 reference."""

from __future__ import annotations

import torch

# Smallest relative error floor per dtype (a few units in the last place of its mantissa), used
# when torch's own error in that dtype happens to be tiny; the main bound is 2x torch's error.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def lora_inputs(M, K, N, r, dtype, device="cpu", bias=True, lead=()):
    """Fresh random x [*lead, M, K], W [N, K], bias [N], A [r, K], B [N, r] (B non-zero)."""
    g = dict(dtype=dtype, device=device)
    x = torch.randn(*lead, M, K, **g)
    w = torch.randn(N, K, **g) / K**0.5
    b = torch.randn(N, **g) if bias else None
    a = torch.randn(r, K, **g) / K**0.5
    bb = torch.randn(N, r, **g) / r**0.5
    return x, w, b, a, bb


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (both in float64)."""
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-30)
    return ((got - ref).abs().max() / scale).item()


def assert_close_like_torch(name, got, ref64, torch_same_dtype, dtype):
    """``got`` must be within 2x the error that plain torch in ``dtype`` makes against float64
    (or the dtype's floor, if torch happens to be closer)."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(got, ref64)
    bound = max(2.0 * rel_err(torch_same_dtype, ref64), FLOOR[dtype])
    assert err <= bound, f"{name} ({dtype}): relative error {err:.3e} > bound {bound:.3e}"
