"""The Triton kernels (interpreted on CPU, native on CUDA) against the float64 reference."""

import pytest
import torch

import lorakern
from lorakern.dropout import keep_mask
from lorakern.reference import lora_backward_reference, lora_forward_reference
from lorakern.triton.configs import SKINNY, all_matmul_configs
from tests.helpers import assert_close_like_torch, lora_inputs

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# M, K (in), N (out): none a multiple of any block size; M=1 is the decode case.
SHAPES = [(37, 45, 53), (1, 70, 33), (130, 19, 150)]
RANKS = [1, 8, 16, 33, 64, 256]


def _run_and_check(M, K, N, r, dtype, device, bias, p, config=None):
    x, w, b, a, bb = lora_inputs(M, K, N, r, dtype, device, bias=bias)
    seed = torch.tensor(987654, device=device)
    s = 1.7
    y, h = torch.ops.lorakern.lora_fwd(x, w, b, a, bb, s, p, seed, "triton")
    f64 = [t.double() if t is not None else None for t in (x, w, b, a, bb)]
    y64, h64 = lora_forward_reference(*f64, s, p, seed)
    y16, h16 = lora_forward_reference(x, w, b, a, bb, s, p, seed)
    assert_close_like_torch("y", y, y64, y16, dtype)
    assert_close_like_torch("h", h, h64, h16, dtype)

    dy = torch.randn(M, N, dtype=dtype, device=device)
    got = torch.ops.lorakern.lora_bwd(dy, x, w, a, bb, h, s, p, seed, True, True, bias, "triton")
    ref64 = lora_backward_reference(dy.double(), *f64[:2], *f64[3:], h64, s, p, seed, True, True, bias)
    ref16 = lora_backward_reference(dy, x, w, a, bb, h16, s, p, seed, True, True, bias)
    for name, g, g64, g16 in zip(("dx", "dA", "dB", "dbias"), got, ref64, ref16):
        if name == "dbias" and not bias:
            assert g.numel() == 0
            continue
        assert_close_like_torch(name, g, g64, g16, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", RANKS)
def test_forward_backward_ranks(dtype, r, device):
    _run_and_check(37, 45, 53, r, dtype, device, bias=True, p=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_forward_backward_shapes_dropout(dtype, M, K, N, bias, p, device):
    _run_and_check(M, K, N, 8, dtype, device, bias=bias, p=p)


@pytest.mark.parametrize("cfg", all_matmul_configs(), ids=str)
def test_every_matmul_config(cfg, device):
    """Each config the launcher can choose computes the same thing (several tiles, ragged edges)."""
    from lorakern.triton import launch

    x, w, b, a, bb = lora_inputs(150, 70, 270, 16, torch.float32, device)
    h = torch.randn(150, 16, device=device)
    out = torch.empty(150, 270, device=device)
    launch.lora_matmul(x, w, h, bb, b, out, 0.5, config=cfg)
    ref = x.double() @ w.double().t() + 0.5 * (h.double() @ bb.double().t()) + b.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", SKINNY, ids=str)
def test_every_skinny_config(cfg, device):
    from lorakern.triton import launch

    a = torch.randn(150, 300, device=device)
    w = torch.randn(20, 300, device=device)
    out = torch.empty(150, 20, device=device)
    rowsum = torch.empty(150, device=device)
    launch.skinny(a, w, out, scale=0.3, rowsum=rowsum, config=cfg)
    torch.testing.assert_close(out.double(), 0.3 * a.double() @ w.double().t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rowsum.double(), a.double().sum(1), rtol=1e-5, atol=1e-4)


def test_dropout_mask_matches_reference_exactly(device):
    """With W = 0, bias = 0, A = I the forward's h is exactly the dropped-out x: compare masks."""
    M, K, p = 67, 16, 0.4
    x = torch.rand(M, K, device=device) + 0.5  # no zeros: a zero in h means dropped
    seed = torch.tensor(31337, device=device)
    eye = torch.eye(K, device=device)
    _, h = torch.ops.lorakern.lora_fwd(
        x, torch.zeros(3, K, device=device), None, eye, torch.zeros(3, K, device=device), 1.0, p, seed, "triton"
    )
    mask = keep_mask(seed, M, K, p)
    assert torch.equal(h != 0, mask)
    torch.testing.assert_close(h[mask], (x / (1 - p))[mask])


def test_end_to_end_3d_noncontiguous(device):
    """lora_linear with x [B, T, K] built as a transposed view, through autograd."""
    for dtype in DTYPES:
        base = torch.randn(19, 3, 41, dtype=dtype, device=device)
        x = base.transpose(0, 1)  # [3, 19, 41], not contiguous
        assert not x.is_contiguous()
        _, w, b, a, bb = lora_inputs(1, 41, 29, 8, dtype, device)
        x.requires_grad_(True)
        a.requires_grad_(True)
        bb.requires_grad_(True)
        b.requires_grad_(True)
        y = lorakern.lora_linear(x, w, b, a, bb, 2.0, backend="triton")
        assert y.shape == (3, 19, 29)
        g = torch.randn_like(y)
        y.backward(g)
        leaves64 = [t.detach().double().requires_grad_() for t in (x, b, a, bb)]
        y64 = lorakern.lora_linear_reference(leaves64[0], w.double(), leaves64[1], leaves64[2], leaves64[3], 2.0)
        y64.backward(g.double())
        leaves = [t.detach().requires_grad_() for t in (x, b, a, bb)]
        y16 = lorakern.lora_linear_reference(leaves[0], w, leaves[1], leaves[2], leaves[3], 2.0)
        y16.backward(g)
        assert_close_like_torch("y", y, y64, y16, dtype)
        for name, t, t64, t16 in zip(("dx", "dbias", "dA", "dB"), (x, b, a, bb), leaves64, leaves):
            assert_close_like_torch(name, t.grad, t64.grad, t16.grad, dtype)


def test_empty_and_single_row(device):
    for M in (0, 1):
        x, w, b, a, bb = lora_inputs(M, 33, 21, 4, torch.float32, device)
        x.requires_grad_(True)
        y = lorakern.lora_linear(x, w, b, a, bb, 1.0, backend="triton")
        assert y.shape == (M, 21)
        y.sum().backward()
        assert x.grad.shape == x.shape
        ref = lorakern.lora_linear_reference(x.detach(), w, b, a, bb, 1.0)
        torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)


def test_only_some_grads(device):
    """Frozen adapter (no grad for A, B) and x without grad: only what is asked is computed."""
    x, w, b, a, bb = lora_inputs(9, 20, 18, 4, torch.float32, device)
    x.requires_grad_(True)
    y = lorakern.lora_linear(x, w, None, a, bb, 1.0, backend="triton")
    y.sum().backward()
    ref = x.detach().requires_grad_(True)
    lorakern.lora_linear_reference(ref, w, None, a, bb, 1.0).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    a.requires_grad_(True)
    x2 = x.detach()
    lorakern.lora_linear(x2, w, b, a, bb, 1.0, backend="triton").sum().backward()
    assert a.grad is not None and x2.grad is None and bb.grad is None
