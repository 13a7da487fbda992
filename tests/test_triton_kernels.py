"""The Triton kernels (interpreted on CPU, native on CUDA) against the float64 reference."""

import pytest
import torch

import lorakern
from lorakern.dropout import keep_mask
from lorakern.reference import lora_backward_reference, lora_forward_reference
from lorakern.triton.configs import SKINNY, all_dy_configs, all_matmul_configs, dy_split
from tests.helpers import LAYOUTS, assert_close_like_torch, layout_leaf, layout_view, lora_inputs

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# M, K (in), N (out): none a multiple of any block size; M=1 is the decode case.
SHAPES = [(37, 45, 53), (1, 70, 33), (130, 19, 150)]
RANKS = [1, 8, 16, 33, 64, 256]


def _run_and_check(M, K, N, r, dtype, device, bias, p, config=None):
    x, w, b, a, bb = lora_inputs(M, K, N, r, dtype, device, bias=bias)
    seed = torch.tensor(987654, device=device)
    s = 1.7
    y, h, z, n = torch.ops.lorakern.lora_fwd(x, w, b, a, bb, s, p, seed, None, "triton")
    f64 = [t.double() if t is not None else None for t in (x, w, b, a, bb)]
    y64, h64 = lora_forward_reference(*f64, s, p, seed)
    y16, h16 = lora_forward_reference(x, w, b, a, bb, s, p, seed)
    assert_close_like_torch("y", y, y64, y16, dtype)
    assert_close_like_torch("h", h, h64, h16, dtype)

    dy = torch.randn(M, N, dtype=dtype, device=device)
    got = torch.ops.lorakern.lora_bwd(dy, x, w, a, bb, h, s, p, seed, None, z, n, True, True, bias, "triton")
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


def _dy_reference(dy, b, h, scale):
    dy, b, h = dy.double(), b.double(), h.double()
    return scale * dy @ b, scale * dy.t() @ h, dy.sum(0)


@pytest.mark.parametrize("cfg", all_dy_configs(), ids=str)
@pytest.mark.parametrize("split", ["none", "132 SMs", "3 tiles"])
def test_every_dy_config_and_split(cfg, split, device, monkeypatch):
    """dh, dB, dbias and DoRA's dm = sum_m dY z from one read of dY: every config, column tiles in
    one run per row panel (one SM) or split over programs with dh summed by atomics (132 SMs; runs
    of 3 tiles, the last one shorter); dY and z transposed views, several row panels, ragged
    edges, two rank blocks (fp32 takes 32 rank columns a program)."""
    from lorakern.triton import launch

    monkeypatch.setattr(launch, "sm_count", lambda device: 1 if split == "none" else 132)
    if split == "3 tiles":  # 5 column tiles (16-bit) -> runs of 3 + 2; 10 (fp32) -> 3 + 3 + 3 + 1
        monkeypatch.setattr(launch, "dy_split", lambda programs, tiles, sms: (-(-tiles // 3), 3))
    M, N, r, s = 150, 300, 40, 0.7
    for dtype in (torch.float32, torch.float16):
        dy = torch.randn(N, M, dtype=dtype, device=device).t()
        b = torch.randn(N, r, dtype=dtype, device=device)
        h = torch.randn(M, r, dtype=dtype, device=device)
        z = torch.randn(N, M, dtype=dtype, device=device).t()
        dh, db, dbias, dm = (torch.full(shape, float("nan"), device=device) for shape in ((M, r), (N, r), (N,), (N,)))
        launch.dy_grads(dy, b, h, dh, db, dbias, s, config=cfg, z=z, dm=dm)
        refs = (*_dy_reference(dy, b, h, s), (dy.double() * z.double()).sum(0))
        for name, got, ref in zip(("dh", "dB", "dbias", "dm"), (dh, db, dbias, dm), refs):
            tol = 1e-5 if dtype == torch.float32 else 1e-3  # fp32 sums of fp16 products: only order differs
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=name)


def test_dy_split_counts():
    """Splits cover every column tile exactly once and fill about two waves of programs."""
    for programs in (1, 3, 64, 128, 264, 1000):
        for tiles in (1, 2, 7, 64, 65, 224):
            splits, per = dy_split(programs, tiles, 132)
            assert (splits - 1) * per < tiles <= splits * per  # every tile, no empty split
            assert splits == 1 or programs < 2 * 132  # split only when the row panels are too few
            assert 2 * programs * splits >= min(2 * 132, programs * tiles)  # at least half of two waves


def test_dy_grads_some_outputs(device):
    """Only dh (frozen adapter, dx wanted), only dbias, only dB: each alone is right."""
    from lorakern.triton import launch

    M, N, r = 33, 70, 5
    dy, b, h = (torch.randn(*shape, device=device) for shape in ((M, N), (N, r), (M, r)))
    refs = _dy_reference(dy, b, h, 1.3)
    for which in range(3):
        outs = [None, None, None]
        outs[which] = torch.full(refs[which].shape, float("nan"), device=device)
        launch.dy_grads(dy, b, h, *outs, 1.3)
        torch.testing.assert_close(outs[which].double(), refs[which], rtol=1e-5, atol=1e-5)


def test_autotune_timing_runs_do_not_add_up(device, monkeypatch):
    """The tuner launches every candidate several times; dB, dbias and dh are summed into by
    atomics, so each launch must start from zero or the timing runs would add up."""
    from lorakern.triton import configs, launch

    def fake_bench(fn, warmup, rep):
        for _ in range(3):
            fn()
        return 1.0

    monkeypatch.setattr(configs, "autotune_enabled", lambda device: True)
    monkeypatch.setattr("triton.testing.do_bench", fake_bench)
    monkeypatch.setattr(configs, "_tuned", {})
    M, N, r = 40, 90, 16
    dy, b, h = (torch.randn(*shape, device=device) for shape in ((M, N), (N, r), (M, r)))
    dh, db, dbias = torch.empty(M, r, device=device), torch.empty(N, r, device=device), torch.empty(N, device=device)
    launch.dy_grads(dy, b, h, dh, db, dbias, 0.5)
    for got, ref in zip((dh, db, dbias), _dy_reference(dy, b, h, 0.5)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("timings,expected", [((2.0, 1.0), "two reads of dY"), ((1.0, 2.0), "one read of dY")])
def test_dy_pass_keeps_the_faster_strategy(timings, expected, device, monkeypatch):
    """Where the tuner runs, both ways of reading dY are timed once per shape and the faster kept
    (both write the full outputs: right grads whichever wins, and after the timing runs)."""
    from lorakern.triton import configs, launch
    from lorakern.triton.lora import TWO_READS, dy_pass

    monkeypatch.setattr(configs, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(configs, "_tuned", {})
    # one config per kernel, so the strategy choice is the only thing timed
    monkeypatch.setattr(launch, "dy_candidates", lambda *args: (all_dy_configs()[0],))
    monkeypatch.setattr(launch, "skinny_candidates", lambda *args: (SKINNY[0],))
    times = iter(timings)

    def fake_bench(fn, warmup, rep):
        for _ in range(2):
            fn()
        return next(times)

    monkeypatch.setattr("triton.testing.do_bench", fake_bench)
    M, N, r = 40, 90, 16
    dy, b, h = (torch.randn(*shape, device=device) for shape in ((M, N), (N, r), (M, r)))
    for _ in range(2):  # the second call reuses the choice (a third timing would exhaust `times`)
        dh, db, dbias = (torch.full(shape, float("nan"), device=device) for shape in ((M, r), (N, r), (N,)))
        assert dy_pass(dy, b, h, dh, db, dbias, 0.5, deterministic=False) == expected
        for got, ref in zip((dh, db, dbias), _dy_reference(dy, b, h, 0.5)):
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert dy_pass(dy, b, h, dh, db, dbias, 0.5, deterministic=True) == TWO_READS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_backward(dtype, device):
    """Under torch.use_deterministic_algorithms the backward takes the atomic-free path: it matches
    the reference and repeats bitwise."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _run_and_check(130, 19, 150, 33, dtype, device, bias=True, p=0.25)
        x, w, b, a, bb = lora_inputs(130, 19, 150, 33, dtype, device)
        dy = torch.randn(130, 150, dtype=dtype, device=device)
        seed = torch.tensor(5, device=device)
        _, h, z, n = torch.ops.lorakern.lora_fwd(x, w, b, a, bb, 1.5, 0.25, seed, None, "triton")
        runs = [torch.ops.lorakern.lora_bwd(dy, x, w, a, bb, h, 1.5, 0.25, seed, None, z, n, True, True, True, "triton")
                for _ in range(2)]
        assert all(torch.equal(g1, g2) for g1, g2 in zip(*runs))
    finally:
        torch.use_deterministic_algorithms(previous)


def test_backward_paths_agree(device):
    """The one-read-of-dY path and the deterministic path give the same grads (fp32: up to order)."""
    from lorakern.triton.lora import backward as lora_backward_triton

    x, w, b, a, bb = lora_inputs(70, 45, 150, 20, torch.float32, device)
    dy = torch.randn(70, 150, device=device)
    h = torch.randn(70, 20, device=device)
    seed = torch.tensor(11, device=device)
    fast, slow = (lora_backward_triton(dy, x, w, a, bb, h, 0.9, 0.1, seed, deterministic=d) for d in (False, True))
    for g1, g2 in zip(fast, slow):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int64_offsets(dtype, device, monkeypatch):
    """The int64 addressing every kernel switches to past 2**31 elements, forced on a small shape
    (forward, backward with dropout, both ways of reading dY)."""
    from lorakern.triton import launch

    monkeypatch.setattr(launch, "needs_int64", lambda *numels: True)
    _run_and_check(70, 45, 150, 20, dtype, device, bias=True, p=0.25)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _run_and_check(70, 45, 150, 20, dtype, device, bias=True, p=0.25)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_dropout_mask_matches_reference_exactly(device):
    """With W = 0, bias = 0, A = I the forward's h is exactly the dropped-out x: compare masks."""
    M, K, p = 67, 16, 0.4
    x = torch.rand(M, K, device=device) + 0.5  # no zeros: a zero in h means dropped
    seed = torch.tensor(31337, device=device)
    eye = torch.eye(K, device=device)
    _, h, *_ = torch.ops.lorakern.lora_fwd(
        x, torch.zeros(3, K, device=device), None, eye, torch.zeros(3, K, device=device), 1.0, p, seed, None, "triton"
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



@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("arg", ["x", "weight", "bias", "lora_A", "lora_B"])
def test_every_argument_in_every_layout(backend, arg, device):
    """Each tensor argument strided, transposed or expanded (stride 0) gives the float64
    reference's output and grads: no kernel may assume a contiguous argument (a bias read
    without its stride was 0.65 off)."""
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    for dtype in (torch.float32, torch.bfloat16):
        plain = dict(zip(names, lora_inputs(13, 37, 29, 5, dtype, device)))
        shape = plain[arg].shape
        g = torch.randn(13, 29, dtype=dtype, device=device)
        for layout in LAYOUTS:
            if layout == "transposed" and len(shape) != 2:
                continue
            runs = []
            for cast in (dtype, torch.float64, "same"):
                leaf = layout_leaf(layout, plain[arg]).detach().to(dtype if cast == "same" else cast)
                leaf.requires_grad_(arg != "weight")
                view = layout_view(layout, leaf, shape)
                assert layout != "expanded" or 0 in view.stride()
                assert not view.is_contiguous() or layout == "transposed" and len(shape) == 1
                args = [view if n == arg else plain[n].to(leaf.dtype) for n in names]
                if cast == dtype:
                    y = lorakern.lora_linear(*args, 1.3, backend=backend)
                else:
                    y = lorakern.lora_linear_reference(*args, 1.3)
                if leaf.requires_grad:
                    y.backward(g.to(leaf.dtype))
                runs.append((y.detach(), leaf.grad))
            (y, dl), (y64, dl64), (y_same, dl_same) = runs
            what = f"({arg} {layout}, {dtype}, {backend})"
            assert_close_like_torch(f"y {what}", y, y64, y_same, dtype)
            if arg != "weight":
                assert_close_like_torch(f"d{arg} {what}", dl, dl64, dl_same, dtype)
