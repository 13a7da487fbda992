"""NF4 format: byte-for-byte against bitsandbytes (the oracle, when installed), state_dict, errors."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lorakern import NF4Weight
from lorakern.nf4.reference import NF4_CODE, dynamic_code, quantize_blockwise_8bit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd shapes: numel odd (the last byte half used), in_features below / not a multiple of the
# blocksize (blocks straddle rows), a 1-D tensor, a tail block of one element.
SHAPES = [(37, 53), (64, 64), (3, 1000), (129,), (300, 257), (11, 96), (4, 4096), (65, 1)]


def test_dynamic_code_is_pinned():
    # The double-quantization code: 256 sorted values in [-0.993, 1], one exact zero.
    code = dynamic_code()
    assert code.shape == (256,) and bool((code[1:] > code[:-1]).all())
    assert code[-1].item() == 1.0 and (code == 0).sum().item() == 1
    digest = hashlib.sha256(code.numpy().tobytes()).hexdigest()[:16]
    assert digest == "e732639a65f497b4", digest


def test_dynamic_code_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_code(), F.create_dynamic_map())


def test_nf4_code_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(torch.tensor(NF4_CODE), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 32, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bit_exact_with_bitsandbytes(dtype, blocksize, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    for shape in SHAPES:
        w = torch.randn(shape, dtype=dtype) * 3
        packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        ours = NF4Weight.quantize(w, blocksize=blocksize, double_quant=double_quant)
        where = f"shape={shape} blocksize={blocksize} double_quant={double_quant}"
        assert torch.equal(ours.packed, packed.reshape(-1)), f"packed bytes differ: {where}"
        assert torch.equal(ours.absmax, qs.absmax), f"absmax differs: {where}"
        if double_quant:
            assert torch.equal(ours.nested_absmax, qs.state2.absmax), where
            assert torch.equal(ours.nested_code, qs.state2.code), where
            assert torch.equal(ours.offset, qs.offset), where


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bit_exact_with_bitsandbytes(dtype, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    torch_dequantize = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    for blocksize in (64, 128):
        for shape in SHAPES:
            w = torch.randn(shape, dtype=dtype)
            packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
            ours = NF4Weight.quantize(w, blocksize, double_quant)
            got = ours.dequantize_reference()
            # bitsandbytes' own pure-torch dequantize (the definition its CUDA kernel follows):
            absmax = ours.absmax_float()
            want = torch_dequantize(packed.reshape(-1), absmax, qs.code, blocksize, shape, dtype)
            assert torch.equal(got, want), f"shape={shape} blocksize={blocksize}"
            # Its public CPU entry point; its C++ kernel mis-places blocks that straddle rows when
            # in_features is not a multiple of the blocksize (bitsandbytes 0.50.2), so only there.
            if len(shape) == 2 and shape[1] % blocksize == 0:
                assert torch.equal(got, F.dequantize_4bit(packed, qs)), f"shape={shape} blocksize={blocksize}"


def test_blockwise_8bit_matches_bitsandbytes_cpu():
    F = pytest.importorskip("bitsandbytes.functional")
    code = dynamic_code()
    for n in (1, 255, 256, 1000, 4097):
        v = torch.randn(n) * torch.rand(()) * 5
        q, absmax = quantize_blockwise_8bit(v, code, 256)
        q_bnb, state = F.quantize_blockwise(v, blocksize=256)
        assert torch.equal(q, q_bnb.reshape(-1)), n
        assert torch.equal(absmax, state.absmax), n


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_params4bit_and_linear4bit(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    lin = torch.nn.Linear(128, 40)  # in % blocksize == 0: see the dequantize test above
    q = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # quantizes
    for obj in (q, q.weight):
        w = NF4Weight.from_bnb(obj)
        assert w.packed.data_ptr() == q.weight.data.data_ptr(), "must wrap, not copy"
        want = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
        assert torch.equal(w.dequantize_reference(), want)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (96, 320)])
def test_from_bnb_after_its_cpu_repacking(double_quant, shape):
    """bitsandbytes on AVX512-BF16 CPUs rewrites a Linear4bit at its first eval forward (codes
    regrouped, absmax transposed and rounded to bfloat16, double quantization undone): read as the
    NF4 weight it now computes with, the bytes re-laid out and the bfloat16 scales."""
    bnb = pytest.importorskip("bitsandbytes")
    F = pytest.importorskip("bitsandbytes.functional")
    if not hasattr(F, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repacking")
    out_f, in_f = shape
    q = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.float32, compress_statistics=double_quant,
                          quant_type="nf4")
    q.load_state_dict(torch.nn.Linear(in_f, out_f).state_dict())
    q = q.to("cpu")
    before = NF4Weight.from_bnb(q)
    want = NF4Weight(before.packed.clone(), before.absmax_float().bfloat16().float(), before.shape, before.dtype,
                     before.blocksize)
    q.weight.data, q.weight.quant_state = F._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu
    w = NF4Weight.from_bnb(q)
    assert torch.equal(w.packed, want.packed) and torch.equal(w.absmax, want.absmax)
    assert w.dtype == torch.float32 and not w.double_quant
    assert NF4Weight.from_bnb(q.weight) is w  # kept while the module's tensors are unchanged
    q.weight.data = q.weight.data.clone()
    assert NF4Weight.from_bnb(q) is not w


def test_fused_layer_after_bitsandbytes_cpu_inference():
    """The user's order on such a CPU: an eval forward through bitsandbytes, then lorakern reads the
    layer; its output is bitsandbytes' (which computes in bfloat16) within bfloat16 rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    F = pytest.importorskip("bitsandbytes.functional")
    if not getattr(F, "has_avx512bf16", lambda: False)():
        pytest.skip("bitsandbytes repacks for its CPU GEMV only on CPUs with AVX512-BF16")
    import lorakern

    q = bnb.nn.Linear4bit(256, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(torch.nn.Linear(256, 64, bias=False).state_dict())
    q = q.to("cpu").eval()
    x = torch.randn(2, 256)
    with torch.no_grad():
        y_bnb = q(x)
    assert q.weight.quant_state.packing_format_for_cpu
    layer = lorakern.FusedLoRALinear.from_linear(q, r=4, lora_alpha=4).eval()  # B = 0: the base alone
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, y_bnb, rtol=2e-2, atol=2e-2)
    w = NF4Weight.from_bnb(q)
    torch.testing.assert_close(y, x @ w.dequantize(torch.float32).t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_and_bnb_keys(double_quant):
    w = NF4Weight.quantize(torch.randn(33, 70), blocksize=64, double_quant=double_quant)
    sd = w.state_dict(prefix="layer.")
    keys = {"layer.weight", "layer.weight.absmax", "layer.weight.quant_map",
            "layer.weight.quant_state.bitsandbytes__nf4"}
    if double_quant:
        keys |= {"layer.weight.nested_absmax", "layer.weight.nested_quant_map"}
    assert set(sd) == keys
    back = NF4Weight.from_state_dict(sd, prefix="layer.")
    assert torch.equal(back.dequantize_reference(), w.dequantize_reference())
    assert back.shape == w.shape and back.blocksize == w.blocksize and back.double_quant == double_quant


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_loads_into_bitsandbytes(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    F = bnb.functional
    w = NF4Weight.quantize(torch.randn(40, 128), blocksize=64, double_quant=double_quant)
    sd = w.state_dict()
    qs = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"}, "cpu")
    assert torch.equal(F.dequantize_4bit(sd["weight"], qs), w.dequantize_reference())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="weight: expected a float16, bfloat16 or float32"):
        NF4Weight.quantize(torch.randint(0, 3, (4, 4)))
    with pytest.raises(ValueError, match="blocksize: expected one of"):
        NF4Weight.quantize(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="inf or NaN"):
        NF4Weight.quantize(torch.tensor([[1.0, float("nan")]]))
    good = NF4Weight.quantize(torch.randn(8, 64), blocksize=64, double_quant=True)
    with pytest.raises(TypeError, match="packed: expected a uint8"):
        NF4Weight(good.packed.float(), good.absmax, good.shape, good.dtype, 64, good.nested_absmax,
                  good.nested_code, good.offset)
    with pytest.raises(ValueError, match="packed: expected 256 bytes"):
        NF4Weight(good.packed[:-1], good.absmax, good.shape, good.dtype, 64, good.nested_absmax,
                  good.nested_code, good.offset)
    with pytest.raises(ValueError, match="packed: expected a contiguous 1-D"):
        NF4Weight(good.packed.view(16, 16).t(), good.absmax, good.shape, good.dtype, 64, good.nested_absmax,
                  good.nested_code, good.offset)
    with pytest.raises(ValueError, match="absmax: expected a contiguous 1-D tensor of 8 blocks"):
        NF4Weight(good.packed, good.absmax[:-1], good.shape, good.dtype, 64, good.nested_absmax,
                  good.nested_code, good.offset)
    with pytest.raises(TypeError, match="absmax: expected torch.uint8"):
        NF4Weight(good.packed, good.absmax.float(), good.shape, good.dtype, 64, good.nested_absmax,
                  good.nested_code, good.offset)
    with pytest.raises(ValueError, match="nested_code: expected a contiguous tensor of shape"):
        NF4Weight(good.packed, good.absmax, good.shape, good.dtype, 64, good.nested_absmax,
                  good.nested_code[:10], good.offset)
    strided = torch.stack([good.nested_code, good.nested_code], 1)[:, 0]  # the right shape, every other float
    with pytest.raises(ValueError, match=r"nested_code: .* got shape \(256,\), strides \(2,\) \(not contiguous\)"):
        NF4Weight(good.packed, good.absmax, good.shape, good.dtype, 64, good.nested_absmax, strided, good.offset)
    with pytest.raises(ValueError, match=r"absmax: .* got shape \(8,\), strides \(2,\) \(not contiguous\)"):
        NF4Weight(good.packed, torch.stack([good.absmax, good.absmax], 1)[:, 0], good.shape, good.dtype, 64,
                  good.nested_absmax, good.nested_code, good.offset)
    sd = good.state_dict()
    sd["weight.quant_map"] = sd["weight.quant_map"] * 2
    with pytest.raises(ValueError, match="quant_map is not the NF4 code"):
        NF4Weight.from_state_dict(sd)
    with pytest.raises(KeyError, match="missing NF4 keys"):
        NF4Weight.from_state_dict({"weight": good.packed})


def test_double_quant_overflow_is_a_clear_error():
    """absmax values near float32's max: their mean overflows (bitsandbytes returns NaN scales)."""
    huge = (torch.rand(4, 64) * 2 - 1) * 3e38  # finite, block maxima ~3e38: their sum is inf
    with pytest.raises(ValueError, match="weight: with double_quant=True the mean of its block absmax"):
        NF4Weight.quantize(huge, 64, double_quant=True)
    w = NF4Weight.quantize(huge, 64)  # without double quantization it is fine
    assert torch.isfinite(w.dequantize_reference(torch.float32)).all()


def _with_item(sd, data: bytes):
    return {**sd, "weight.quant_state.bitsandbytes__nf4": torch.tensor(list(data), dtype=torch.uint8)}


@pytest.mark.parametrize("double_quant", [False, True])
def test_corrupt_quant_state_is_one_clear_error(double_quant):
    import json

    good = NF4Weight.quantize(torch.randn(24, 128), 64, double_quant=double_quant)
    sd = good.state_dict()
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    key = "state_dict: weight.quant_state.bitsandbytes__nf4"

    def edited(**over):
        return json.dumps({**meta, **over}).encode()

    cases = [
        (json.dumps(meta).encode()[:-7], "not valid UTF-8 JSON"),
        (b"\xff\xfe\x00garbage", "not valid UTF-8 JSON"),
        (b"[1, 2, 3]", "expected a JSON object, got list"),
        (edited(dtype="nonsense"), "dtype 'nonsense' is not one of"),
        (edited(dtype=None), "dtype None is not one of"),
        (edited(shape=[-24, -128]), r"shape \[-24, -128\] is not a list of positive integers"),
        (edited(shape="24x128"), "shape '24x128' is not a list"),
        (edited(shape=[]), r"shape \[\] is not a list"),
        (edited(blocksize=65), "blocksize 65 is not one of"),
        (edited(quant_type="fp4"), "quant_type 'fp4' is not 'nf4'"),
    ]
    if double_quant:
        cases.append((edited(nested_offset="x"), "nested_offset 'x' is not a finite number"))
    for data, match in cases:
        with pytest.raises(ValueError, match=f"{key}: {match}"):
            NF4Weight.from_state_dict(_with_item(sd, data))
    # A consistent item that does not fit the tensors beside it: one error naming the weight.
    with pytest.raises(ValueError, match="the NF4 weight under 'weight' is inconsistent: packed: expected 768"):
        NF4Weight.from_state_dict(_with_item(sd, edited(shape=[12, 128])))
    with pytest.raises(ValueError, match="item that is not a uint8 tensor|expected a uint8 tensor of JSON bytes"):
        NF4Weight.from_state_dict({**sd, "weight.quant_state.bitsandbytes__nf4": "nf4"})
    if double_quant:
        del sd["weight.nested_absmax"]
        with pytest.raises(ValueError, match="missing weight.nested_absmax"):
            NF4Weight.from_state_dict(sd)
