"""The QLoRA layer's CPU decode plan (lorakern/nf4/plan.py): after one checked call, later calls
with the same tensors skip the checks; anything the plan read changing, or a call it cannot serve,
takes the checked path. Every result is compared with the checked op (same bits: the same kernel
call) and with the float64 reference."""

import copy

import pytest
import torch
from helpers import assert_close_like_torch
from torch import nn

import lorakern
from lorakern import layers
from lorakern.nf4 import native

pytestmark = pytest.mark.skipif(native.unavailable_reason(torch.device("cpu")) is not None,
                                reason="lorakern._C is not built")

IN, OUT, R = 200, 72, 5  # not multiples of any block: the kernel's generic walk (in % 32 != 0)


def make(in_f=IN, out_f=OUT, r=R, bias=True, **kw):
    base = nn.Linear(in_f, out_f, bias=bias)
    layer = lorakern.FusedLoRALinear.from_linear(base, r=r, lora_alpha=2 * r, base_quant="nf4",
                                                 init_lora_weights=False, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer.eval()


def reference(layer, x, dtype=torch.float64):
    """The layer's math on its NF4 weight as stored, in ``dtype`` (plain torch)."""
    with torch.no_grad():
        W = layer.weight_nf4.dequantize(torch.float32).to(dtype)
        x = x.clone().to(dtype)
        y = x @ W.t() + layer.scaling * (x @ layer.lora_A.to(dtype).t()) @ layer.lora_B.to(dtype).t()
        return y if layer.bias is None else y + layer.bias.to(dtype)


def assert_like_float64(layer, x, y):
    assert_close_like_torch("y", y, reference(layer, x), reference(layer, x, torch.float32), torch.float32)


def checked(layer, x):
    """The op the layer's checked path calls, on the layer's current state."""
    return lorakern.qlora_linear(x, layer.weight_nf4, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                                 training=False, backend=layer.backend, magnitude=layer.lora_magnitude_vector)


@pytest.fixture
def count_checked(monkeypatch):
    """The number of calls that took the checked path."""
    calls = []
    real = layers.qlora_linear

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "qlora_linear", spy)
    return calls


def expect(layer, x, y):
    with torch.no_grad():
        want = checked(layer, x)
    assert torch.equal(y, want)
    assert_like_float64(layer, x, y)


@pytest.mark.parametrize("in_f", [IN, 256])  # 256: the blockwise fast walk
@pytest.mark.parametrize("shape", [(1,), (3,), (16,), (2, 3), (1, 1, 5)])
def test_plan_serves_later_calls(isa, count_checked, in_f, shape):
    layer = make(in_f=in_f, double_quant=in_f == 256)
    x = torch.randn(*shape, in_f)
    with torch.no_grad():
        first = layer(x)
        assert len(count_checked) == 1 and layer._decode_plan is not None
        for _ in range(3):
            x = torch.randn(*shape, in_f)
            y = layer(x)
            assert y.shape == (*shape, OUT)
            expect(layer, x, y)
    assert len(count_checked) == 1
    assert first.shape == (*shape, OUT)


@pytest.mark.parametrize("r", [1, 16, 256])
@pytest.mark.parametrize("shape", [(17,), (40,), (3, 13), (2, 150)])
def test_plan_serves_many_rows(isa, count_checked, shape, r):
    """Above 16 rows the one-call kernel (base, LoRA term, bias) takes x too where it serves the
    base (AVX2 / AVX-512, in_features % 32 == 0), and so does the plan; the plain C++ build takes
    the checked path on every call (its tiles + BLAS)."""
    layer = make(in_f=256, r=r)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(*shape, 256)
            y = layer(x)
            assert y.shape == (*shape, OUT)
            expect(layer, x, y)
    assert len(count_checked) == (3 if isa == "scalar" else 1)
    assert (layer._decode_plan is None) == (isa == "scalar")


def test_inference_mode_and_frozen_grads(count_checked):
    layer = make()
    with torch.inference_mode():
        layer(torch.randn(2, IN))
        x = torch.randn(2, IN)
        y = layer(x)
    expect(layer, x, y)
    # Grad enabled but nothing needs one (a frozen layer): the plan serves too.
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, IN)
    expect(layer, x, layer(x))
    assert len(count_checked) == 1


def test_grads_take_the_checked_path(count_checked):
    layer = make()
    with torch.no_grad():
        layer(torch.randn(2, IN))
    x = torch.randn(2, IN, requires_grad=True)
    y = layer(x)  # lora_A / lora_B require grad: autograd
    assert y.grad_fn is not None and len(count_checked) == 2
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None
    expect(layer, x.detach(), y.detach())


def test_dropout_in_training_takes_the_checked_path(count_checked):
    layer = make(lora_dropout=0.5)
    with torch.no_grad():
        layer(torch.randn(2, IN))
        x = torch.randn(2, IN)
        expect(layer, x, layer(x))  # eval: dropout off, the plan serves
        assert len(count_checked) == 1
        layer.train()
        y = layer(x)
    assert len(count_checked) == 2
    assert not torch.equal(y, checked(layer.eval(), x))  # half of x's LoRA input dropped


@pytest.mark.parametrize("change", ["B data", "A param", "A in place", "scaling", "bias added", "bias removed",
                                    "weight", "B transposed"])
def test_what_the_plan_read_changes(count_checked, change):
    layer = make()
    with torch.no_grad():
        layer(torch.randn(3, IN))
        assert layer._decode_plan is not None
        if change == "B data":
            layer.lora_B.data = torch.randn(OUT, R)
        elif change == "A param":
            layer.lora_A = nn.Parameter(torch.randn(R, IN))
        elif change == "A in place":
            layer.lora_A.mul_(-3.0)
        elif change == "scaling":
            layer.scaling = 0.25
        elif change == "bias added":
            layer.bias = None
            layer(torch.randn(3, IN))
            layer.bias = nn.Parameter(torch.randn(OUT))
        elif change == "bias removed":
            layer.bias = None
        elif change == "weight":
            layer.weight_nf4 = lorakern.NF4Weight.quantize(torch.randn(OUT, IN), blocksize=32)
        elif change == "B transposed":  # same values, columns strided: not the plan's layout
            layer.lora_B.data = layer.lora_B.data.t().contiguous().t()
        x = torch.randn(3, IN)
        y = layer(x)
    expect(layer, x, y)
    # In-place value changes need no new plan (the kernel reads the tensors where they are).
    assert len(count_checked) == (1 if change == "A in place" else 3 if change == "bias added" else 2)


def test_bad_state_after_the_plan_raises():
    layer = make()
    with torch.no_grad():
        layer(torch.randn(2, IN))
        layer.lora_A.data = layer.lora_A.data[: R - 1]  # same address, another shape
        with pytest.raises(ValueError, match="lora_A|lora_B"):
            layer(torch.randn(2, IN))
        layer.lora_A.data = torch.randn(R, IN, dtype=torch.float64)
        with pytest.raises((TypeError, ValueError), match="lora_A|dtype"):
            layer(torch.randn(2, IN))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (5,), (16,), (2, 3), (40,)])
def test_half_layer_is_one_call_with_the_float32_bits(isa, count_checked, dtype, shape, monkeypatch):
    """A bfloat16 / float16 QLoRA layer on the CPU: one native call (base, LoRA term and bias in
    float32, y rounded once), on the checked path and then through the plan, giving the float32
    layer's bits on the same values, rounded; above 16 rows too where the CPU has no dot products
    of x's dtype (forced here; the plain C++ build takes its tiles there). A float32 x then is the
    checked path's dtype error, not a call that reads the half adapter as float32."""
    from lorakern.ops import bases

    monkeypatch.setitem(bases._fast_half, dtype, False)
    half = make(in_f=256, r=16).to(dtype)
    f32 = copy.deepcopy(half).float()
    one_call = len(shape) > 1 or shape[0] <= 16 or isa != "scalar"
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(*shape, 256).to(dtype)
            y = half(x)
            assert y.dtype == dtype
            if one_call:
                assert torch.equal(y, f32(x.float()).to(dtype))
            else:
                assert_close_like_torch("y", y, reference(half, x), reference(half, x, dtype), dtype)
        assert (half._decode_plan is not None) == one_call
        assert len(count_checked) == (2 if one_call else 3)  # one_call: f32 and half once each, then plans
        with pytest.raises(TypeError, match="dtype"):
            half(torch.randn(*shape, 256))


@pytest.mark.parametrize("case", ["float64", "bf16", "int", "in", "strided", "large M", "1-D", "empty"])
def test_calls_the_plan_cannot_serve(case):
    layer = make()
    with torch.no_grad():
        layer(torch.randn(2, IN))
        if case in ("float64", "int", "in"):
            x = {"float64": torch.randn(2, IN, dtype=torch.float64), "int": torch.ones(2, IN, dtype=torch.int32),
                 "in": torch.randn(2, IN + 1)}[case]
            with pytest.raises((TypeError, ValueError), match="x"):
                layer(x)
            return
        if case == "bf16":  # autocast: the checked path's casts and result, not the plan's float32 call
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x = torch.randn(2, IN)
                y = layer(x)
                assert torch.equal(y, checked(layer, x))
            assert y.dtype == torch.bfloat16
            return
        x = {"strided": torch.randn(IN, 3).t(), "large M": torch.randn(40, IN), "1-D": torch.randn(IN),
             "empty": torch.randn(0, IN)}[case]
        y = layer(x)
    assert y.shape == (*x.shape[:-1], OUT)
    if x.numel():
        assert_like_float64(layer, x, y)


def test_no_plan_for_dora_or_the_reference_backend():
    for layer in (make(use_dora=True), make(backend="reference")):
        with torch.no_grad():
            layer(torch.randn(2, IN))
            x = torch.randn(2, IN)
            y = layer(x)
            assert torch.equal(y, checked(layer, x))
        assert layer._decode_plan is None


def test_copies_and_loaded_layers(count_checked):
    layer = make()
    with torch.no_grad():
        layer(torch.randn(2, IN))
        twin = copy.deepcopy(layer)  # its own tensors: the copied plan's key no longer matches
        fresh = make()
        fresh.load_state_dict(layer.state_dict())
        for m in (twin, fresh):
            x = torch.randn(2, IN)
            y = m(x)
            expect(m, x, y)
            assert torch.equal(y, layer(x))
