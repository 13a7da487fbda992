"""The QLoRA layer (FusedLoRALinear with an NF4 base) against the float64 LoRA reference on the
dequantized weight: forward, every gradient, dropout, shapes, serialization, bitsandbytes interop."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_like_torch, assert_same_as_op
from torch import nn

from lorakern import FusedLoRALinear, NF4Weight, lora_linear_reference, qlora_linear
from lorakern.dropout import draw_seed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def qlora_inputs(M, K, N, r, dtype, double_quant=False, blocksize=64, lead=()):
    w = NF4Weight.quantize((torch.randn(N, K) / K**0.5).to(dtype), blocksize, double_quant)
    x = torch.randn(*lead, M, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype)
    a = torch.randn(r, K, dtype=dtype) / K**0.5
    bb = torch.randn(N, r, dtype=dtype) / r**0.5
    return x, w, b, a, bb


def grads_of(fn, inputs, dy):
    """``[y, d input for each input]`` of ``fn(*inputs)`` under the upstream gradient ``dy``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def needs_triton(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from lorakern.backend import interpreting

        if not (interpreting() or torch.cuda.is_available()):
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qlora_matches_float64_reference(dtype, double_quant, p, backend):
    needs_triton(backend)
    s = 0.7
    for M, K, N, r in [(1, 128, 40, 8), (13, 64, 33, 1), (37, 96, 17, 33), (3, 53, 9, 4)]:
        x, w, b, a, bb = qlora_inputs(M, K, N, r, dtype, double_quant, blocksize=64 if K % 2 else 32)
        dy = torch.randn(M, N, dtype=dtype)
        torch.manual_seed(1)  # the layer draws its dropout seed from here; the reference gets the same one
        layer = lambda x_, b_, a_, bb_, w=w: qlora_linear(x_, w, b_, a_, bb_, s, p, backend=backend)
        got = grads_of(layer, (x, b, a, bb), dy)
        torch.manual_seed(1)
        seed = draw_seed(x.device) if p > 0 else None
        w64 = w.dequantize_reference(torch.float64)

        def ref(x, b, a, bb, w64=w64, seed=seed):
            return lora_linear_reference(x, w64.to(x.dtype), b, a, bb, s, p, seed)

        want = grads_of(ref, [t.double() for t in (x, b, a, bb)], dy)
        same = grads_of(ref, (x, b, a, bb), dy)
        for name, g, w_, t in zip(("y", "dx", "dbias", "dA", "dB"), got, want, same):
            assert_close_like_torch(f"{name} M={M} K={K} N={N} r={r} p={p}", g, w_, t, dtype)


def test_3d_noncontiguous_and_empty():
    x, w, b, a, bb = qlora_inputs(5, 128, 24, 8, torch.float32)
    x3 = torch.randn(2, 7, 256)[..., ::2]
    y = qlora_linear(x3, w, b, a, bb, 2.0, backend="native")
    want = lora_linear_reference(x3.double(), w.dequantize_reference(torch.float64), b.double(), a.double(),
                                 bb.double(), 2.0)
    assert y.shape == (2, 7, 24) and (y.double() - want).abs().max() < 1e-4
    assert qlora_linear(torch.randn(0, 128), w, b, a, bb, 2.0).shape == (0, 24)


def test_opcheck_qlora_ops():
    x, w, b, a, bb = qlora_inputs(6, 128, 24, 8, torch.float32, double_quant=True)
    seed = torch.tensor(1234)
    nf4 = (w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize)
    from lorakern.backend import interpreting

    backends = ("reference", "native") + (("triton",) if interpreting() or torch.cuda.is_available() else ())
    for backend in backends:
        args = (x, *nf4, 24, 128, torch.float32, b, a.requires_grad_(), bb.requires_grad_(), 0.5, 0.2, seed,
                None, backend)
        torch.library.opcheck(torch.ops.lorakern.qlora_fwd, args)
        _, h, z, n = torch.ops.lorakern.qlora_fwd(*args)
        dy = torch.randn(6, 24)
        torch.library.opcheck(torch.ops.lorakern.qlora_bwd,
                              (dy, x, *nf4, 24, 128, torch.float32, a.detach(), bb.detach(), h, 0.5, 0.2, seed,
                               None, z, n, True, True, True, backend))


def test_layer_from_linear_quantizes_and_trains():
    lin = nn.Linear(128, 40)
    layer = FusedLoRALinear.from_linear(lin, r=8, lora_alpha=16, base_quant="nf4", double_quant=True)
    assert layer.weight is None and layer.base_quant == "nf4" and layer.bias is lin.bias
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 128)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert all(not t.requires_grad for t in layer.weight_nf4.tensors().values())
    # The adapter-free part is the NF4 base: a fresh-B layer equals the dequantized linear.
    fresh = FusedLoRALinear.from_linear(lin, r=8, base_quant="nf4")
    torch.testing.assert_close(fresh(x), nn.functional.linear(x, fresh.weight_nf4.dequantize(), lin.bias))


def test_to_linear_merge_and_errors():
    layer = FusedLoRALinear(64, 20, r=4, lora_alpha=8, base_quant="nf4", init_lora_weights=False)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="use to_linear"):
        layer.merge()
    with pytest.raises(ValueError, match="base_quant: expected one of"):
        FusedLoRALinear(64, 20, base_quant="int4")
    with pytest.raises(ValueError, match="lora_B: expected shape"):
        qlora_linear(x, layer.weight_nf4, None, layer.lora_A.detach(), torch.randn(20, 5), 1.0)
    with pytest.raises(TypeError, match="lora_A: expected dtype"):
        qlora_linear(x, layer.weight_nf4, None, layer.lora_A.detach().half(), layer.lora_B.detach(), 1.0)
    with pytest.raises(ValueError, match="x: expected last dim in_features=64"):
        qlora_linear(torch.randn(3, 60), layer.weight_nf4, None, layer.lora_A, layer.lora_B, 1.0)


def test_state_dict_round_trip_and_module_moves():
    layer = FusedLoRALinear(96, 24, r=4, lora_alpha=8, base_quant="nf4", double_quant=True, init_lora_weights=False)
    sd = layer.state_dict()
    assert {"weight", "weight.absmax", "weight.nested_absmax", "lora_A", "lora_B", "bias"} <= set(sd)
    other = FusedLoRALinear(96, 24, r=4, lora_alpha=8, base_quant="nf4", double_quant=True)
    other.load_state_dict(sd)
    x = torch.randn(5, 96)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    packed = layer.weight_nf4.packed
    layer.half()  # casts the LoRA parameters, never the packed bytes
    assert layer.weight_nf4.packed is packed and layer.lora_A.dtype == torch.float16


def test_saved_activations_hold_no_dense_weight():
    layer = FusedLoRALinear(256, 512, r=8, base_quant="nf4")
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    biggest = max(t.numel() * t.element_size() for t in saved)
    assert biggest < 512 * 256 * 4 // 4, f"a saved tensor of {biggest} bytes: the dense weight leaked"


def test_bnb_linear4bit_interop():
    bnb = pytest.importorskip("bitsandbytes")
    lin = nn.Linear(128, 48)
    q = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    layer = FusedLoRALinear.from_linear(q, r=4, lora_alpha=8)
    x = torch.randn(6, 128)
    torch.testing.assert_close(layer(x), q(x), rtol=1e-5, atol=1e-5)  # B = 0: the base alone
    # Same state_dict keys and bytes for the base as bitsandbytes writes.
    ours, theirs = layer.state_dict(), q.state_dict()
    assert set(theirs) <= set(ours)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.slow
def test_compile_fullgraph_qlora_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        FusedLoRALinear(64, 96, r=4, lora_alpha=8, base_quant="nf4", init_lora_weights=False),
        nn.ReLU(),
        FusedLoRALinear(96, 32, r=8, lora_alpha=8, base_quant="nf4", double_quant=True, init_lora_weights=False),
    )
    x = torch.randn(2, 5, 64)
    y_eager = model(x)
    y_eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    y = torch.compile(model, fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g)


def test_inference_path_equals_autograd_path():
    # Under no_grad the layer skips the custom op's dispatcher (same body); results must not change.
    layer = FusedLoRALinear(128, 40, r=8, lora_alpha=16, base_quant="nf4", init_lora_weights=False).eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_training_path_equals_the_op(p):
    """Outside torch.compile, qlora_linear with grads runs the op's bodies and autograd without its
    dispatch: output and every grad bitwise those of torch.ops.lorakern.qlora_fwd with its autograd."""
    w = NF4Weight.quantize(torch.randn(40, 128), blocksize=64, double_quant=True)
    x, b, a, bb = torch.randn(2, 5, 128), torch.randn(40), torch.randn(8, 128), torch.randn(40, 8)

    def run(via_op, leaves, seed):
        if not via_op:
            return qlora_linear(leaves[0], w, *leaves[1:], 0.5, p, backend="reference")
        y, *_ = torch.ops.lorakern.qlora_fwd(leaves[0].reshape(-1, 128), w.packed, w.absmax, w.nested_absmax,
                                            w.nested_code, w.offset, w.blocksize, 40, 128, torch.float32,
                                            *leaves[1:], 0.5, p, seed, None, "reference")
        return y.reshape(2, 5, 40)

    assert_same_as_op(run, (x, b, a, bb), torch.randn(2, 5, 40), p, seed=3)


def test_triton_backend_runs_the_triton_kernels(monkeypatch):
    needs_triton("triton")
    import lorakern.triton.lora as triton_lora

    calls = []
    for name in ("forward", "backward"):
        real = getattr(triton_lora, name)
        monkeypatch.setattr(triton_lora, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    x, w, b, a, bb = qlora_inputs(20, 64, 24, 4, torch.float32)
    a.requires_grad_()
    qlora_linear(x, w, b, a, bb, 1.0, backend="triton").sum().backward()
    assert calls == ["forward", "backward"]
    with pytest.raises(ValueError, match="backend must be one of"):
        qlora_linear(x, w, b, a, bb, 1.0, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qlora_layer_on_cuda(dtype):
    # auto picks the CUDA GEMV for M <= 16 and the Triton path above: both against float64.
    for M in (1, 16, 300):
        x, w, b, a, bb = qlora_inputs(M, 256, 192, 16, dtype, double_quant=True)
        x, b, a, bb = (t.cuda() for t in (x, b, a, bb))
        w = w.to("cuda")
        dy = torch.randn(M, 192, dtype=dtype, device="cuda")
        got = grads_of(lambda x_, b_, a_, bb_, w=w: qlora_linear(x_, w, b_, a_, bb_, 0.5), (x, b, a, bb), dy)
        w64 = w.dequantize_reference(torch.float64)

        def ref(x_, b_, a_, bb_, w64=w64):
            return lora_linear_reference(x_, w64.to(x_.dtype), b_, a_, bb_, 0.5)

        want = grads_of(ref, [t.double() for t in (x, b, a, bb)], dy)
        same = grads_of(ref, (x, b, a, bb), dy)
        for name, g, w_, t in zip(("y", "dx", "dbias", "dA", "dB"), got, want, same):
            assert_close_like_torch(f"cuda {name} M={M}", g, w_, t, dtype)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("arg", ["x", "bias", "lora_A", "lora_B"])
def test_every_argument_in_every_layout(backend, arg):
    """As for the dense op: each tensor argument strided, transposed or expanded gives the float64
    reference's output and grads (the one-call CPU kernel takes contiguous tensors only)."""
    from helpers import LAYOUTS, layout_leaf, layout_view

    needs_triton(backend)
    names = ("x", "bias", "lora_A", "lora_B")
    for M in (3, 40):  # the one-call CPU path and the general one
        x, w, b, a, bb = qlora_inputs(M, 128, 24, 5, torch.float32)
        plain = dict(zip(names, (x, b, a, bb)))
        shape = plain[arg].shape
        g = torch.randn(M, 24)
        for layout in LAYOUTS:
            if layout == "transposed" and len(shape) != 2:
                continue
            runs = []
            for dtype in (torch.float32, torch.float64):
                leaf = layout_leaf(layout, plain[arg]).detach().to(dtype).requires_grad_(True)
                view = layout_view(layout, leaf, shape)
                args = [view if n == arg else plain[n].to(dtype) for n in names]
                if dtype == torch.float32:
                    y = qlora_linear(args[0], w, *args[1:], 1.3, backend=backend)
                else:
                    y = lora_linear_reference(args[0], w.dequantize_reference(dtype), *args[1:], 1.3)
                y.backward(g.to(dtype))
                runs.append((y.detach(), leaf.grad))
            (y, dl), (y64, dl64) = runs
            what = f"({arg} {layout}, M={M}, {backend})"
            assert (y.double() - y64).abs().max() < 1e-4, f"y {what}"
            assert (dl.double() - dl64).abs().max() < 1e-3 * max(1.0, dl64.abs().max().item()), f"d{arg} {what}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_strided_argument_gives_the_contiguous_bits(dtype):
    """On the CPU (native backend) a strided, transposed or expanded x, bias, A or B gives the
    same y, bit for bit, as the contiguous tensor, in eval and in training: the one-call kernel
    takes a contiguous copy rather than a second path that rounds the base and the LoRA term apart
    (it differed in the last bits). The grads come from torch's products on the tensors as given
    (a transposed A takes another BLAS kernel), so they agree to float32 rounding."""
    from helpers import LAYOUTS, layout_leaf, layout_view

    names = ("x", "bias", "lora_A", "lora_B")
    for M in (3, 40):
        x, w, b, a, bb = qlora_inputs(M, 128, 24, 5, torch.float32)
        plain = dict(zip(names, (t.to(dtype) for t in (x, b, a, bb))))
        g = torch.randn(M, 24).to(dtype)

        def run(args, grad, w=w, g=g):
            leaves = [t.detach().requires_grad_(grad) for t in args]
            y = qlora_linear(*leaves[:1], w, *leaves[1:], 1.3, backend="native")
            if not grad:
                return [y]
            y.backward(g)
            return [y.detach(), *(t.grad for t in leaves)]

        for grad in (False, True):
            for arg in names:
                for layout in LAYOUTS:
                    if layout == "transposed" and plain[arg].dim() != 2:
                        continue
                    view = layout_view(layout, layout_leaf(layout, plain[arg]), plain[arg].shape)
                    got = run([view if n == arg else plain[n] for n in names], grad)
                    want = run([view.contiguous() if n == arg else plain[n] for n in names], grad)
                    assert torch.equal(got[0], want[0]), f"{dtype} M={M} {arg} {layout} grad={grad}"
                    for u, v in zip(got[1:], want[1:]):  # torch's own products in the backward
                        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("double_quant", [False, True])
def test_merged_nf4_requantizes_the_merged_weight(double_quant):
    """``merged_nf4``: with a zero adapter the base's own bytes come back (NF4 of an NF4-decoded
    weight is itself); with an adapter, the NF4 of ``W + s B A`` computed in fp32, same layout."""
    torch.manual_seed(3)
    base = torch.nn.Linear(256, 96, bias=False)
    layer = FusedLoRALinear.from_linear(base, r=4, lora_alpha=8, base_quant="nf4", blocksize=64,
                                                 double_quant=double_quant)
    same = layer.merged_nf4()
    assert torch.equal(same.packed, layer.weight_nf4.packed)
    # Double quantization re-quantizes the block scales around a new mean: each scale moves within its
    # 8-bit code's step (2^-8 relative), the codes stay.
    torch.testing.assert_close(same.dequantize(torch.float32), layer.weight_nf4.dequantize(torch.float32),
                               rtol=2**-8 if double_quant else 0, atol=1e-6)
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merged_nf4()
    want = NF4Weight.quantize(layer.weight_nf4.dequantize(torch.float32) + layer.delta_weight(torch.float32),
                                       64, double_quant)
    assert merged.blocksize == 64 and merged.double_quant == double_quant
    assert torch.equal(merged.packed, want.packed)
    assert not torch.equal(merged.packed, layer.weight_nf4.packed)
