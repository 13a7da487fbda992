"""The counter-based dropout: deterministic, identical in torch and Triton, never stored."""

import pytest
import torch

import lorakern
from lorakern.dropout import keep_mask, keep_threshold, random_bits


def _spec_bits(seed: int, index: int) -> int:
    """The definition in lorakern/dropout.py's docstring, in plain Python integers."""
    m = 0xFFFFFFFF

    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & m
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & m
        return x ^ (x >> 16)

    lo, hi = index & m, index >> 32
    key = fmix(seed ^ ((hi * 0x9E3779B9) & m))
    return fmix((fmix(lo ^ key) + key) & m) >> 8


def test_known_answers():
    """Pin the hash: a change of definition would silently change every user's masks."""
    index = [0, 1, 2, 3, 2**32 + 5, 2**40 + 7]
    bits = random_bits(torch.tensor(12345), torch.tensor(index)).tolist()
    assert bits == [5829275, 2246078, 5010749, 11816450, 6967904, 1575472]
    assert bits == [_spec_bits(12345, i) for i in index]


def test_torch_hash_matches_the_spec():
    idx = torch.randint(0, 2**45, (2000,))
    for seed in (0, 1, 2**31 - 2):
        got = random_bits(torch.tensor(seed), idx).tolist()
        assert got == [_spec_bits(seed, i) for i in idx.tolist()]


def test_same_seed_same_mask_and_seeds_differ():
    a = keep_mask(torch.tensor(7), 64, 96, 0.3)
    assert torch.equal(a, keep_mask(torch.tensor(7), 64, 96, 0.3))
    assert not torch.equal(a, keep_mask(torch.tensor(8), 64, 96, 0.3))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_fraction(p):
    n = 400_000
    kept = keep_mask(torch.tensor(2024), 1, n, p).double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sigma, f"kept {kept:.5f}, expected {1 - p:.5f} +- {6 * sigma:.5f}"


def test_threshold_is_exact_for_zero():
    assert keep_threshold(0.0) == 0
    assert keep_mask(torch.tensor(1), 10, 10, 0.0).all()


def test_masks_for_consecutive_seeds_are_uncorrelated():
    m1 = keep_mask(torch.tensor(100), 256, 256, 0.5).double().flatten()
    m2 = keep_mask(torch.tensor(101), 256, 256, 0.5).double().flatten()
    corr = torch.corrcoef(torch.stack([m1, m2]))[0, 1].item()
    assert abs(corr) < 0.02


try:
    import triton
    import triton.language as tl

    from lorakern.triton.kernels import dropout_keep

    @triton.jit
    def keep_kernel(idx_ptr, out_ptr, seed, threshold, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        idx = tl.load(idx_ptr + offs, mask=offs < n, other=0)
        keep = dropout_keep(seed.to(tl.uint32), idx, threshold)
        tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)
except ImportError:
    keep_kernel = None


@pytest.mark.skipif(keep_kernel is None, reason="triton is not installed")
def test_triton_hash_equals_torch_hash():
    """The Triton twin of the hash, run in a tiny kernel, gives the same bits (indices past 2**32 too)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    idx = torch.cat([torch.arange(300), torch.arange(300) + 2**32 - 150, torch.arange(100) + 2**41]).to(device)
    for seed, p in [(0, 0.5), (123456789, 0.1), (2**31 - 2, 0.73)]:
        out = torch.empty(idx.numel(), dtype=torch.int8, device=device)
        keep_kernel[(1,)](idx, out, seed, keep_threshold(p), idx.numel(), BLOCK=1024)
        want = random_bits(torch.tensor(seed), idx.cpu()) >= keep_threshold(p)
        assert torch.equal(out.cpu().bool(), want), f"seed {seed}, p {p}"


def test_dropout_seed_from_torch_generator():
    """torch.manual_seed repeats a run; consecutive calls draw different masks."""
    x, w, a, b = torch.randn(8, 16), torch.randn(4, 16), torch.randn(2, 16), torch.randn(4, 2)
    torch.manual_seed(3)
    y1 = lorakern.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.5, backend="reference")
    y2 = lorakern.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.5, backend="reference")
    torch.manual_seed(3)
    y3 = lorakern.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.5, backend="reference")
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)


def test_mean_scale_is_unbiased():
    """E[dropout(x)] = x: the 1/(1-p) scale is right."""
    x = torch.rand(512, 512, dtype=torch.float64) + 0.5
    from lorakern.dropout import apply_dropout

    mean = torch.stack([apply_dropout(x, 0.3, torch.tensor(s)) for s in range(40)]).mean(0)
    assert abs((mean / x).mean().item() - 1.0) < 2e-3


def test_backward_uses_forward_mask():
    """The grad of A must be computed with the forward's mask: compare with the float64 oracle
    on the same seed, for both backends."""
    x = torch.randn(33, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 24, dtype=torch.float64)
    a = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(55)
    y, *_ = torch.ops.lorakern.lora_fwd(x, w, None, a, b, 0.5, 0.4, seed, None, "reference")
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), g)
    y_ref = lorakern.lora_linear_reference(x, w, None, a, b, 0.5, 0.4, seed)
    grads_ref = torch.autograd.grad(y_ref, (x, a, b), g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_tensors_hold_no_mask(p, use_dora):
    """Saved for backward: x, h [M, r], the parameters and a 0-d seed; nothing else of [M, K].
    DoRA adds its magnitude [N], z [M, N] and the norm [N]; plain LoRA's two empty placeholders."""
    M, K, N, r = 64, 48, 40, 4
    layer = lorakern.FusedLoRALinear(K, N, r=r, lora_dropout=p, backend="reference", use_dora=use_dora)
    x = torch.randn(M, K, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    shapes = sorted(tuple(t.shape) for t in saved)
    extra = [(N,), (M, N), (N,)] if use_dora else [(0,), (0,)]
    assert shapes == sorted([(M, K), (N, K), (r, K), (N, r), (M, r)] + extra + ([()] if p > 0 else [])), shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "column-slice", "expanded", "one-column", "empty"])
def test_native_cpu_dropout_equals_the_torch_hash(dtype, layout):
    """lorakern._C's one-pass dropout (the CPU path of apply_dropout) is the torch-op mask bit for
    bit, scaled alike, on every row layout a caller can hand it (it only reads x)."""
    from lorakern import dropout as D
    from lorakern.nf4 import native

    if native.extension() is None:
        pytest.skip("lorakern._C is not built")
    x = {"contiguous": lambda: torch.randn(37, 129, dtype=dtype),
         "column-slice": lambda: torch.randn(23, 40, dtype=dtype)[:, 3:31],
         "expanded": lambda: torch.randn(1, 19, dtype=dtype).expand(11, 19),
         "one-column": lambda: torch.randn(9, 4, dtype=dtype)[:, 1:2],
         "empty": lambda: torch.randn(0, 8, dtype=dtype)}[layout]()
    x[0:1] = float("nan") if x.numel() and layout != "expanded" else x[0:1]  # NaN * 0 stays NaN, as in torch
    for p, seed in ((0.1, 7), (0.5, 2**31 - 2)):
        seed = torch.tensor(seed)
        got = D._native_dropout(x, p, seed)
        assert got is not None
        want = x * keep_mask(seed, *x.shape, p).to(dtype) * (1.0 / (1.0 - p))
        assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        assert torch.equal(torch.signbit(got), torch.signbit(want))  # -x * 0 is -0 on both


def test_native_cpu_dropout_leaves_autograd_and_other_dtypes_to_torch():
    from lorakern import dropout as D

    seed = torch.tensor(3)
    assert D._native_dropout(torch.randn(4, 5, requires_grad=True), 0.2, seed) is None
    assert D._native_dropout(torch.randn(4, 5, dtype=torch.bfloat16), 0.2, seed) is None
    assert D._native_dropout(torch.randn(5, 4).t(), 0.2, seed) is None  # column stride 5
