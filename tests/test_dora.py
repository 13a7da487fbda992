"""DoRA (lora_linear / qlora_linear with a magnitude, FusedLoRALinear(use_dora=True)) against its
float64 definition and PEFT's DoRA layer: outputs, every grad, dropout, shapes, every backend and
base; the weight norm and its caches; merge; bad inputs; a zero-norm row."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_like_torch, layout_leaf, layout_view
from torch import nn

import lorakern
from lorakern import FusedLoRALinear, NF4Weight
from lorakern.dropout import apply_dropout, draw_seed
from lorakern.ops import dora
from lorakern.ops.bases import DenseBase, NF4Base
from lorakern.ops.common import Adapter
from lorakern.reference import dora_linear_reference, dora_weight_norm_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
S = 1.7


def needs_triton():
    pytest.importorskip("triton")
    from lorakern.backend import interpreting

    if not (interpreting() or torch.cuda.is_available()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


def dora_inputs(M, K, N, r, dtype, device="cpu", bias=True, lead=(), nf4=False):
    """x [*lead, M, K], W [N, K] (or its NF4 form), bias, A, B and a magnitude m = n * U(0.5, 1.5),
    so that the scale m / n is not 1. Returns (x, W dense in dtype, w_nf4 or None, bias, A, B, m)."""
    g = dict(dtype=dtype, device=device)
    w = torch.randn(N, K, device=device) / K**0.5
    w_nf4 = NF4Weight.quantize(w.to(dtype), 64, double_quant=True) if nf4 else None
    w = w_nf4.dequantize(dtype) if nf4 else w.to(dtype)
    x = torch.randn(*lead, M, K, **g)
    b = torch.randn(N, **g) if bias else None
    a = torch.randn(r, K, **g) / K**0.5
    bb = torch.randn(N, r, **g) / r**0.5
    n = dora_weight_norm_reference(w.double(), a.double(), bb.double(), S)
    m = (n * (torch.rand(N, device=device, dtype=torch.float64) + 0.5)).to(dtype)
    return x, w, w_nf4, b, a, bb, m


def run_dora(backend, x, w, w_nf4, b, a, bb, m, p, seed_value=11):
    """y and the grads of (x, A, B, m, bias) through lorakern, and the dropout seed it drew."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, a, bb, m, b)]
    torch.manual_seed(seed_value)
    if w_nf4 is None:
        y = lorakern.lora_linear(leaves[0], w, leaves[4], leaves[1], leaves[2], S, p, backend=backend,
                                 magnitude=leaves[3])
    else:
        y = lorakern.qlora_linear(leaves[0], w_nf4, leaves[4], leaves[1], leaves[2], S, p, backend=backend,
                                  magnitude=leaves[3])
    torch.manual_seed(seed_value)
    seed = draw_seed(x.device) if p > 0 else None
    return y, leaves, seed


def reference(x, w, b, a, bb, m, p, seed, dtype=None):
    """y and its leaves by the definition, in ``dtype`` (default: float64)."""
    cast = (lambda t: t.double()) if dtype is None else (lambda t: t.to(dtype))
    leaves = [cast(t).detach().requires_grad_() if t is not None else None for t in (x, a, bb, m, b)]
    y = dora_linear_reference(leaves[0], cast(w), leaves[4], leaves[1], leaves[2], leaves[3], S, p, seed)
    return y, leaves


def check_against_float64(backend, M, K, N, r, dtype, p, bias=True, lead=(), nf4=False, device="cpu"):
    x, w, w_nf4, b, a, bb, m = dora_inputs(M, K, N, r, dtype, device, bias=bias, lead=lead, nf4=nf4)
    y, leaves, seed = run_dora(backend, x, w, w_nf4, b, a, bb, m, p)
    y64, l64 = reference(x, w, b, a, bb, m, p, seed)
    y16, l16 = reference(x, w, b, a, bb, m, p, seed, dtype)
    assert_close_like_torch("y", y, y64, y16, dtype)
    dy = torch.randn_like(y)
    for out, d in ((y, dy), (y64, dy.double()), (y16, dy)):
        out.backward(d)
    for name, got, g64, g16 in zip(("dx", "dA", "dB", "dm", "dbias"), leaves, l64, l16):
        if got is None:
            continue
        assert got.grad.dtype == got.dtype, name
        assert_close_like_torch(name, got.grad, g64.grad, g16.grad, dtype)


# -- every backend and base against the float64 definition ----------------------------------------

SHAPES = [(37, 45, 53), (1, 70, 33), (130, 19, 150)]  # none a multiple of any block; M=1: decode


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_backend(dtype, M, K, N, p, bias):
    check_against_float64("reference", M, K, N, 8, dtype, p, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_backend(dtype, M, K, N, p, bias):
    device = needs_triton()
    check_against_float64("triton", M, K, N, 8, dtype, p, bias, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 16, 33, 64, 256])
def test_triton_ranks(dtype, r):
    device = needs_triton()
    check_against_float64("triton", 37, 45, 53, r, dtype, 0.0, device=device)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 5, 40])  # the decode kernel (with A's rows in one pass), tiled
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_nf4_base(backend, dtype, M, p):
    """QDoRA: against the definition on the dequantized weight."""
    device = needs_triton() if backend == "triton" else "cpu"
    check_against_float64(backend, M, 192, 40, 8, dtype, p, nf4=True, device=device)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["3-D", "transposed", "strided", "expanded"])
def test_3d_and_non_contiguous(backend, layout):
    """x [B, T, K] (a transposed view), strided / expanded x and parameters."""
    device = needs_triton() if backend == "triton" else "cpu"
    x, w, _, b, a, bb, m = dora_inputs(6, 24, 20, 4, torch.float32, device, lead=(3,))
    if layout == "3-D":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        views = (x, a, bb, m, b)
    else:
        views = tuple(layout_view(layout, layout_leaf(layout, t), t.shape) for t in (x[0], a, bb))
        views = (*views, layout_view("strided", m, m.shape), layout_view("strided", b, b.shape))
    y = lorakern.lora_linear(views[0], w.t().contiguous().t(), views[4], views[1], views[2], S, backend=backend,
                             magnitude=views[3])
    y64 = dora_linear_reference(*(v.double() for v in (views[0], w)), views[4].double(), views[1].double(),
                                views[2].double(), views[3].double(), S)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)


def test_deterministic_triton_backward_equals_atomic_one():
    """Under use_deterministic_algorithms the dY pass is two reads with dm in a fixed order."""
    device = needs_triton()
    x, w, _, b, a, bb, m = dora_inputs(70, 40, 36, 8, torch.float32, device)
    grads = []
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        try:
            y, leaves, _ = run_dora("triton", x, w, None, b, a, bb, m, 0.0)
            y.backward(torch.ones_like(y))
        finally:
            torch.use_deterministic_algorithms(False)
        grads.append([t.grad for t in leaves])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    """The norm is detached by definition (no gradient flows through it), so a numerical derivative
    in A or B, which moves the norm, is not the op's: gradcheck perturbs x, m and the bias, and A's
    and B's grads are checked against the float64 reference's autograd (its norm detached too)."""
    x, w, _, b, a, bb, m = dora_inputs(5, 9, 7, 3, torch.float64)
    seed = torch.tensor(3)
    for p, sd in ((0.0, None), (0.3, seed)):
        def f(x, m, b, p=p, sd=sd):
            return torch.ops.lorakern.lora_fwd(x, w, b, a, bb, S, p, sd, m, "reference")[0]

        assert torch.autograd.gradcheck(f, [t.clone().requires_grad_() for t in (x, m, b)])
        dy = torch.randn(5, 7, dtype=torch.float64)
        got = [t.clone().requires_grad_() for t in (a, bb)]
        want = [t.clone().requires_grad_() for t in (a, bb)]
        torch.ops.lorakern.lora_fwd(x, w, b, *got, S, p, sd, m, "reference")[0].backward(dy)
        dora_linear_reference(x, w, b, *want, m, S, p, sd).backward(dy)
        for g, r in zip(got, want):
            torch.testing.assert_close(g.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_opcheck():
    x, w, w_nf4, b, a, bb, m = dora_inputs(6, 128, 24, 4, torch.float32, nf4=True)
    seed = torch.tensor(5)
    req = [t.clone().requires_grad_() for t in (x, b, a, bb, m)]
    args = (req[0], w, req[1], req[2], req[3], S, 0.2, seed, req[4], "reference")
    torch.library.opcheck(torch.ops.lorakern.lora_fwd.default, args)
    _, h, z, n = torch.ops.lorakern.lora_fwd(x, w, b, a, bb, S, 0.2, seed, m, "reference")
    dy = torch.randn(6, 24)
    for flags in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(torch.ops.lorakern.lora_bwd.default,
                              (dy, x, w, a, bb, h, S, 0.2, seed, m, z, n, *flags, "reference"))
    nf4 = (w_nf4.packed, w_nf4.absmax, w_nf4.nested_absmax, w_nf4.nested_code, w_nf4.offset, w_nf4.blocksize)
    for backend in ("reference", "native"):
        args = (req[0], *nf4, 24, 128, torch.float32, req[1], req[2], req[3], S, 0.2, seed, req[4], backend)
        torch.library.opcheck(torch.ops.lorakern.qlora_fwd, args)


# -- the weight norm and its caches ---------------------------------------------------------------

@pytest.mark.parametrize("nf4", [False, True])
def test_norm_without_the_dense_product_equals_the_definition(nf4):
    _, w, w_nf4, _, a, bb, _ = dora_inputs(1, 192, 40, 8, torch.float32, nf4=nf4)
    base = NF4Base(w_nf4) if nf4 else DenseBase(w)
    got = dora.weight_norm(base, Adapter(a, bb, S, 0.0, None), "native" if nf4 else "reference")
    torch.testing.assert_close(got.double(), dora_weight_norm_reference(w.double(), a.double(), bb.double(), S),
                               rtol=2e-6, atol=0)


def test_norm_cache_follows_every_in_place_change(monkeypatch):
    """Cached while W, A, B, s are unchanged (eval: one norm for many calls); any in-place change
    to W, A or B (for A and B also one through ``.data``), or another s, computes it again."""
    computed = []
    real = dora.norm_from
    monkeypatch.setattr(dora, "norm_from", lambda *a: computed.append(1) or real(*a))
    x, w, _, b, a, bb, m = dora_inputs(3, 20, 12, 4, torch.float32)

    def check(scaling=S):
        y = lorakern.lora_linear(x, w, b, a, bb, scaling, magnitude=m, backend="reference")
        torch.testing.assert_close(y.double(), dora_linear_reference(x.double(), w.double(), b.double(), a.double(),
                                                                     bb.double(), m.double(), scaling),
                                   rtol=1e-5, atol=1e-5)

    check()
    check()
    assert len(computed) == 1
    for t in (a, bb, w):
        t.mul_(1.5)
        check()
    assert len(computed) == 4
    check(2 * S)
    assert len(computed) == 5
    m.mul_(2.0)  # the magnitude is not in the norm: applied per call
    check(2 * S)
    assert len(computed) == 5
    # Writes through .data leave the version counter alone (PEFT's hotswap_adapter writes so): A
    # and B are compared by value with the copies kept beside the norm.
    a.data.copy_(a.flip(0))
    check(2 * S)
    bb.data.mul_(0.5)
    check(2 * S)
    assert len(computed) == 7
    check(2 * S)
    assert len(computed) == 7


def test_eval_forward_reads_w_once_with_a_cached_norm(monkeypatch):
    """In eval the norm comes from the cache: no pass over W beyond the base product."""
    layer = FusedLoRALinear(40, 24, r=4, use_dora=True, init_lora_weights=False, backend="reference").eval()
    x = torch.randn(2, 40)
    with torch.no_grad():
        layer(x)
        calls = []
        real = DenseBase.linear
        monkeypatch.setattr(DenseBase, "linear", lambda self, *a, **k: calls.append(a[0].shape) or real(self, *a, **k))
        layer(x)
    assert calls == [(2, 40)]


# -- PEFT's DoRA layer ----------------------------------------------------------------------------

class HashDropout(nn.Module):
    """PEFT's dropout slot filled with lorakern's mask (drawn as lora_linear draws its seed), so
    PEFT's DoRA with dropout can be compared element for element."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        seed = draw_seed(x.device)
        return apply_dropout(x.reshape(-1, x.shape[-1]), self.p, seed).reshape(x.shape)


def _peft_pair(use_rslora, bias, p):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(48, 40, bias=bias)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = Net()
    cfg = peft.LoraConfig(r=8, lora_alpha=24, target_modules=["proj"], lora_dropout=p, use_rslora=use_rslora,
                          init_lora_weights=False, use_dora=True)
    model = peft.get_peft_model(net, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(40) + 0.5)
    if bias:
        layer.base_layer.bias.requires_grad_(True)
    fused = copy.deepcopy(model)
    if p > 0:
        layer.lora_dropout["default"] = HashDropout(p)
    return model, fused


def _assert_fp32_rounding(got, ref, name):
    bound = 16 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    assert got.shape == ref.shape and err <= bound, f"{name}: max |diff| {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_peft_dora(use_rslora, bias, p, mode):
    """fuse(model) on PEFT's DoRA layer: outputs and the grads of x, A, B, m and bias equal PEFT's
    to fp32 rounding, with dropout (PEFT's second base product on dropout(x)) and without."""
    from lorakern.integrations.peft import fuse

    model, fused = _peft_pair(use_rslora, bias, p)
    assert fuse(fused) == 1
    x = torch.randn(3, 5, 48)
    results = []
    for mdl in (model, fused):
        mdl.train(mode == "train")
        xi = x.clone().requires_grad_()
        torch.manual_seed(42)
        y = mdl(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        grads = {n: q.grad for n, q in mdl.named_parameters() if q.requires_grad}
        results.append((y.detach(), xi.grad, grads))
    (y0, dx0, g0), (y1, dx1, g1) = results
    _assert_fp32_rounding(y1, y0, "y")
    _assert_fp32_rounding(dx1, dx0, "dx")
    assert any("lora_magnitude_vector" in n for n in g0) and (not bias or any("bias" in n for n in g0))
    for n in g0:
        _assert_fp32_rounding(g1[n], g0[n], n)


def test_layer_matches_peft_and_merges_as_peft():
    """FusedLoRALinear(use_dora=True) with PEFT's parameters: same output; merge, to_linear() and
    a merged state_dict loaded into a fresh layer give PEFT's merged weight; unmerge restores W."""
    model, _ = _peft_pair(False, True, 0.0)
    layer = model.base_model.model.proj
    fused = FusedLoRALinear(48, 40, r=8, lora_alpha=24, use_dora=True, backend="reference")
    with torch.no_grad():
        fused.weight.copy_(layer.base_layer.weight)
        fused.bias.copy_(layer.base_layer.bias)
        fused.lora_A.copy_(layer.lora_A["default"].weight)
        fused.lora_B.copy_(layer.lora_B["default"].weight)
        fused.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(4, 48)
    with torch.no_grad():
        _assert_fp32_rounding(fused(x), model(x), "y")
        w0 = fused.weight.clone()
        merged_peft = copy.deepcopy(model).merge_and_unload().proj.weight
        _assert_fp32_rounding(fused.to_linear().weight, merged_peft, "to_linear")
        fused.merge()
        _assert_fp32_rounding(fused.weight, merged_peft, "merge")
        _assert_fp32_rounding(fused(x), model(x), "merged y")
        state = fused.state_dict()
        assert {"lora_magnitude_vector", "merged", "merged_weight_norm"} <= set(state)
        fresh = FusedLoRALinear(48, 40, r=8, lora_alpha=24, use_dora=True, backend="reference")
        fresh.load_state_dict(state)
        assert fresh.merged
        fresh.unmerge()
        fused.unmerge()
        for lay in (fused, fresh):
            _assert_fp32_rounding(lay.weight, w0, "unmerged W")
            _assert_fp32_rounding(lay(x), model(x), "unmerged y")


def test_fresh_layer_equals_its_base_and_trains():
    """PEFT's init: B = 0 and m = ||W||, so a fresh DoRA layer is its base; one step moves m."""
    lin = nn.Linear(40, 24)
    layer = FusedLoRALinear.from_linear(lin, r=4, use_dora=True, backend="reference")
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.vector_norm(lin.weight, dim=1))
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), lin(x))
    layer(x).square().sum().backward()
    assert layer.lora_magnitude_vector.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert "use_dora=True" in repr(layer)


def test_nf4_layer():
    """QDoRA in the module: m initialised from the decoded W, the forward is qlora_linear's, merge
    raises (the 4-bit base cannot absorb it) and to_linear() holds the merged weight."""
    lin = nn.Linear(128, 40)
    layer = FusedLoRALinear.from_linear(lin, r=4, use_dora=True, base_quant="nf4", init_lora_weights=False)
    w = layer.weight_nf4.dequantize(torch.float32)
    torch.testing.assert_close(layer.lora_magnitude_vector.double(), dora_weight_norm_reference(
        w.double(), layer.lora_A.double(), layer.lora_B.double(), layer.scaling), rtol=1e-6, atol=0)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.3)
        x = torch.randn(3, 128)
        ref = dora_linear_reference(x, w, lin.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                                    layer.scaling)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.to_linear()(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="NF4 base cannot absorb"):
        layer.merge()


# -- edge cases and bad inputs --------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_norm_row_is_nan_as_in_peft(backend):
    """A row with W_j + s (B A)_j = 0 has norm 0 and m_j / 0 is not a number: PEFT's output column
    j is nan (inf - inf or 0 * inf), and so is ours; the other columns are unaffected."""
    peft = pytest.importorskip("peft")
    device = needs_triton() if backend == "triton" else "cpu"
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[3] = 0.0
    net = nn.Sequential(lin)
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    fused = FusedLoRALinear.from_linear(copy.deepcopy(lin), r=4, use_dora=True, backend=backend).to(device)
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = model(x)
        got = fused(x.to(device)).cpu()
    assert torch.isnan(want[:, 3]).all() and torch.isnan(got[:, 3]).all()
    keep = [j for j in range(16) if j != 3]
    torch.testing.assert_close(got[:, keep], want[:, keep])


def test_bad_magnitude_gets_a_clear_error():
    x, w, w_nf4, b, a, bb, m = dora_inputs(3, 128, 24, 4, torch.float32, nf4=True)
    for fn, weight in ((lorakern.lora_linear, w), (lorakern.qlora_linear, w_nf4)):
        for bad, exc, match in [
            (torch.randn(23), ValueError, r"magnitude: expected shape \[24\] \(out_features\)"),
            (torch.randn(24, 1), ValueError, r"magnitude: expected shape \[24\]"),
            (m.double(), TypeError, "magnitude: expected"),
            (m.to("meta"), ValueError, "magnitude: expected device cpu"),
            ([1.0] * 24, TypeError, "magnitude: expected a torch.Tensor"),
        ]:
            with pytest.raises(exc, match=match):
                fn(x, weight, b, a, bb, S, magnitude=bad)
    _, h, z, n = torch.ops.lorakern.lora_fwd(x, w, b, a, bb, S, 0.0, None, m, "reference")
    dy = torch.randn(3, 24)
    for bad_z, bad_n, match in [
        (z[:, :5], n, r"z: expected shape \[3, 24\]"),
        (z, n[:5], r"norm: expected a torch.float32 tensor of shape \[24\]"),
        (z, n.double(), "norm: expected a torch.float32 tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            torch.ops.lorakern.lora_bwd(dy, x, w, a, bb, h, S, 0.0, None, m, bad_z, bad_n, True, True, True,
                                        "reference")
    with pytest.raises(TypeError, match="use_dora: expected a bool"):
        FusedLoRALinear(8, 8, use_dora="yes")


def test_under_autocast_the_magnitude_is_cast_too():
    x, w, _, b, a, bb, m = dora_inputs(4, 32, 16, 4, torch.float32)
    mm = m.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lorakern.lora_linear(x, w, b, a, bb, S, magnitude=mm, backend="reference")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert mm.grad.dtype == torch.float32
    ref = dora_linear_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), m.double(), S)
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)
