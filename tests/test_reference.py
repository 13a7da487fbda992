"""The reference path (the CPU backend) against float64, gradcheck, and opcheck of the ops."""

import pytest
import torch

import lorakern
from lorakern.reference import lora_forward_reference
from tests.helpers import FLOOR, lora_inputs, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [1, 7, 64, 256])
def test_reference_dtype_error_is_rounding_only(dtype, r):
    """In low precision the reference's error stays at the dtype's rounding level x sqrt(K)."""
    x, w, b, a, bb = lora_inputs(41, 97, 61, r, dtype)
    y, _ = lora_forward_reference(x, w, b, a, bb, 0.5, 0.0, None)
    f64 = [t.double() for t in (x, w, b, a, bb)]
    y64, _ = lora_forward_reference(*f64, 0.5, 0.0, None)
    eps = torch.finfo(dtype).eps
    assert rel_err(y, y64) < max(8 * eps, FLOOR[dtype]) * 97**0.5


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(p, bias):
    x, w, b, a, bb = lora_inputs(7, 11, 5, 3, torch.float64, bias=bias)
    seed = torch.tensor(99)
    leaves = [t.requires_grad_() for t in (x, a, bb) + ((b,) if bias else ())]

    def f(x, a, bb, *maybe_b):
        bias_t = maybe_b[0] if maybe_b else None
        return torch.ops.lorakern.lora_fwd(x, w, bias_t, a, bb, 1.3, p, seed, None, "reference")[0]

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from lorakern.backend import interpreting

        if not interpreting():
            pytest.skip("CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1")
    x, w, b, a, bb = lora_inputs(9, 20, 12, 4, torch.float32)
    seed = torch.tensor(5)
    for p, s in ((0.0, None), (0.2, seed)):
        args = (x.requires_grad_(), w, b.requires_grad_(), a.requires_grad_(), bb.requires_grad_(), 2.0, p, s, None,
                backend)
        torch.library.opcheck(torch.ops.lorakern.lora_fwd.default, args)
    y, h, z, n = torch.ops.lorakern.lora_fwd(x.detach(), w, b.detach(), a.detach(), bb.detach(), 2.0, 0.2, seed, None,
                                             backend)
    dy = torch.randn_like(y)
    for flags in ((True, True, True), (False, True, False), (True, False, True)):
        args = (dy, x.detach(), w, a.detach(), bb.detach(), h, 2.0, 0.2, seed, None, z, n, *flags, backend)
        torch.library.opcheck(torch.ops.lorakern.lora_bwd.default, args)


def test_lora_linear_matches_reference_3d_noncontiguous():
    x = torch.randn(5, 4, 30).transpose(0, 1)
    _, w, b, a, bb = lora_inputs(1, 30, 14, 6, torch.float32)
    y = lorakern.lora_linear(x, w, b, a, bb, 0.7, backend="reference")
    want = x @ w.t() + b + 0.7 * (x @ a.t()) @ bb.t()
    torch.testing.assert_close(y, want)
