"""The bfloat16 product of the native CPU kernels (``avx512-bf16``: AVX512-BF16's vdpbf16ps), for
bfloat16 x at 1 to 16 rows (1 and 2 where the weight is whole 128-column chunks of blocks of >= 64
columns): each weight is its float32 value rounded to bfloat16 (what a dequantize to bfloat16
gives), products summed in float32, y rounded once. Skipped where the CPU lacks it."""

from __future__ import annotations

import pytest
import torch

from lorakern import INT4Weight, NF4Weight
from lorakern.nf4 import native

ISA = "avx512-bf16"
pytestmark = pytest.mark.skipif(
    native.extension() is None or ISA not in native.extension().available_isas(),
    reason="the CPU (or build) has no AVX512-BF16 path")

# (out, in, blocksize, double quantization): odd out (not a multiple of any tile's 3, 4, 6 or 8
# rows, nor of the 48-row pieces), in % blocksize != 0 (rows start mid-block: the per-step block
# walk), in % 128 != 0 (no chunk walk at 1 to 4 rows), larger blocks (2, 4 and 8 steps each; one or
# two blocks a chunk), nested scales with groups changing mid-row, blocksize 32.
SHAPES = [(101, 256, 64, False), (37, 96, 64, False), (50, 384, 128, True), (23, 1024, 256, False),
          (40, 1088, 64, True), (7, 4096, 64, False), (61, 640, 64, True), (19, 160, 32, False),
          (13, 256, 32, False)]
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16]


@pytest.fixture(autouse=True)
def _bf16_isa(monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, ISA)


def _bf16_weight(w) -> torch.Tensor:
    """The weights the product multiplies by: the float32 dequantize rounded to bfloat16, float64."""
    return w.dequantize(torch.float32).to(torch.bfloat16).double()


def _check(name, got, ref, x, w64, extra=None):
    """got (bfloat16) against the float64 ``ref``: within y's rounding (half a bfloat16 ulp, 2^-8
    of |ref| at most) plus float32 accumulation (2^-16 of sum |x| |w|: ~100x what float32 sums of
    these lengths make), ``extra`` an absolute slack for terms of another rounding."""
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape, name
    scale = x.double().abs() @ w64.abs().T
    bound = ref.abs() * 2.0**-8 + scale * 2.0**-16 + (0.0 if extra is None else extra)
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), f"{name}: max error {err.max():.3e}, worst excess {(err - bound).max():.3e}"


def _chunks(in_f, bs):
    """Whether the 1- and 2-row calls take this path: 128-column chunks of whole blocks >= 64."""
    return in_f % 128 == 0 and bs >= 64 and in_f % bs == 0


def test_against_float64_with_bfloat16_weights():
    for out_f, in_f, bs, dq in SHAPES:
        w = NF4Weight.quantize(torch.randn(out_f, in_f) / in_f**0.5, bs, double_quant=dq)
        w64 = _bf16_weight(w)
        for M in ROWS if _chunks(in_f, bs) else [M for M in ROWS if M >= 3]:
            x = torch.randn(M, in_f).to(torch.bfloat16)
            _check(f"{(out_f, in_f, bs, dq)} M={M}", native.cpu_matmul(x, w, False), x.double() @ w64.T, x, w64)


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_layer_call_adds_bias_and_lora_term(adapter_dtype):
    """The QLoRA layer's one call: y = x W^T + bias + s (x A^T) B^T with h = x A^T returned; the
    term and h in float32 from x's values (as the float32 kernels compute them), y rounded once."""
    for (out_f, in_f, bs, dq), M, r in (((101, 256, 64, False), 5, 16), ((37, 96, 64, False), 16, 3),
                                        ((50, 384, 128, True), 9, 64), ((7, 4096, 64, False), 3, 1),
                                        ((101, 256, 64, False), 1, 16), ((61, 640, 64, True), 2, 8)):
        w = NF4Weight.quantize(torch.randn(out_f, in_f) / in_f**0.5, bs, double_quant=dq)
        w64 = _bf16_weight(w)
        x = torch.randn(M, in_f).to(torch.bfloat16)
        A = (torch.randn(r, in_f) / in_f**0.5).to(adapter_dtype)
        B = (torch.randn(out_f, r) / r**0.5).to(adapter_dtype)
        bias = torch.randn(out_f).to(adapter_dtype)
        y, h = native.cpu_qlora_forward(x, w, bias, A, B, 0.7)
        h64 = x.double() @ A.double().T
        ref = x.double() @ w64.T + bias.double() + 0.7 * h64 @ B.double().T
        where = f"{(out_f, in_f, bs, dq)} M={M} r={r} {adapter_dtype}"
        assert h.dtype == adapter_dtype, where
        tol_h = 2.0**-8 if adapter_dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(h.double(), h64, rtol=tol_h, atol=tol_h * float(h64.abs().max())), where
        term = 0.7 * (h64.abs() @ B.double().abs().T) * 2.0**-16 + bias.double().abs() * 2.0**-20
        _check(where, y, ref, x, w64, extra=term)


@pytest.mark.parametrize("in_f, M", [(64, 4), (128, 1), (128, 4), (256, 2), (256, 7)])
def test_the_weights_are_rounded_to_bfloat16(in_f, M):
    """Outputs where bfloat16 weights and float32 weights round y differently (and neither is near a
    rounding boundary) take the bfloat16 weights' value: the product ran on the vdpbf16ps kernel
    (each walk: 1 to 4 rows on 128-column chunks, or steps of 32), and the float32 kernels (forced:
    avx512) give the other, so the check can tell them apart."""
    w = NF4Weight.quantize(torch.randn(1024, in_f) / in_f**0.5, 64)
    x = torch.randn(M, in_f).to(torch.bfloat16)
    wf = w.dequantize(torch.float32).double()
    ref_b, ref_f = x.double() @ _bf16_weight(w).T, x.double() @ wf.T
    rb, rf = ref_b.to(torch.bfloat16), ref_f.to(torch.bfloat16)
    slack = (x.double().abs() @ wf.abs().T) * 2.0**-20  # far above float32 sums of 64 terms
    stable = ((ref_b - slack).to(torch.bfloat16) == rb) & ((ref_b + slack).to(torch.bfloat16) == rb)
    stable &= ((ref_f - slack).to(torch.bfloat16) == rf) & ((ref_f + slack).to(torch.bfloat16) == rf)
    picked = stable & (rb != rf)
    assert int(picked.sum()) >= 20, "the case must hold outputs that tell the two kernels apart"
    assert torch.equal(native.cpu_matmul(x, w, False)[picked], rb[picked])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(native.ISA_ENV, "avx512")
        assert torch.equal(native.cpu_matmul(x, w, False)[picked], rf[picked])


def test_other_calls_take_the_float32_kernels():
    """17 rows, 1 and 2 rows where the weight has no 128-column chunks of whole blocks (in % 128 !=
    0, blocksize 32), float16 and float32 x, the transposed product dY W and a width the vector walk
    does not take (in % 32 != 0): the same bits as the avx512 path's float32 kernels."""
    w = NF4Weight.quantize(torch.randn(70, 256) / 16, 64, double_quant=True)
    odd = NF4Weight.quantize(torch.randn(33, 53) / 8, 64)
    cases = [(torch.randn(17, 256).to(torch.bfloat16), w, False)]
    for shape, bs in (((37, 96), 64), ((19, 160), 32), ((13, 256), 32)):
        wt = NF4Weight.quantize(torch.randn(shape) / 8, bs)
        cases += [(torch.randn(M, shape[1]).to(torch.bfloat16), wt, False) for M in (1, 2)]
    cases += [(torch.randn(5, 256).to(dt), w, False) for dt in (torch.float16, torch.float32)]
    cases += [(torch.randn(5, 70).to(torch.bfloat16), w, True), (torch.randn(5, 53).to(torch.bfloat16), odd, False)]
    for x, wt, transpose in cases:
        got = native.cpu_matmul(x, wt, transpose)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(native.ISA_ENV, "avx512")
            want = native.cpu_matmul(x, wt, transpose)
        assert torch.equal(got, want), (tuple(x.shape), x.dtype, transpose)


def test_thread_counts_give_the_same_bits():
    w = NF4Weight.quantize(torch.randn(1001, 512) / 22, 64, double_quant=True)  # 21 pieces, the last short
    previous = torch.get_num_threads()
    try:
        for M in (3, 8, 16):
            x = torch.randn(M, 512).to(torch.bfloat16)
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs.append(native.cpu_matmul(x, w, False))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), M
    finally:
        torch.set_num_threads(previous)


def test_int4_base():
    """The INT4 base (QA-LoRA's): its block tables (code * scale + shift, one rounding) rounded to
    bfloat16. Against float64 of the dequantize's weights (rounded twice, so a weight may round to
    the neighbouring bfloat16: 2^-8 of that one product)."""
    for symmetric in (False, True):
        wq = INT4Weight.quantize(torch.randn(45, 384) / 20, 64, symmetric=symmetric)
        w64 = _bf16_weight(wq)
        for M in (3, 8, 13):
            x = torch.randn(M, 384).to(torch.bfloat16)
            ref = x.double() @ w64.T
            one_flip = (x.double().abs() @ w64.abs().T) * 2.0**-8 / 8
            got = native.cpu_matmul(x, wq.native_view(), False)
            _check(f"int4 symmetric={symmetric} M={M}", got, ref, x, w64, extra=one_flip)


def test_bfloat16_qlora_layer_in_eval_is_the_one_call():
    """A bfloat16 ``FusedLoRALinear`` on an NF4 base, in eval on the CPU (2-D and 3-D x, 1 to 16
    rows): the native call of this path, bit for bit, within bfloat16's rounding of float64."""
    from lorakern import FusedLoRALinear

    linear = torch.nn.Linear(256, 101).to(torch.bfloat16)
    layer = FusedLoRALinear.from_linear(linear, r=8, lora_alpha=16, init_lora_weights=False, base_quant="nf4").eval()
    w64 = _bf16_weight(layer.weight_nf4)
    with torch.no_grad():
        for shape in ((1, 256), (3, 256), (2, 5, 256), (16, 256)):
            x = torch.randn(shape).to(torch.bfloat16)
            y = layer(x)
            x2 = x.reshape(-1, 256)
            direct, _ = native.cpu_qlora_forward(x2, layer.weight_nf4, layer.bias, layer.lora_A, layer.lora_B,
                                                 layer.scaling)
            assert torch.equal(y.reshape(-1, 101), direct), shape
            ref = (x2.double() @ w64.T + layer.bias.double()
                   + layer.scaling * (x2.double() @ layer.lora_A.double().T) @ layer.lora_B.double().T)
            term = layer.scaling * ((x2.double().abs() @ layer.lora_A.double().abs().T)
                                    @ layer.lora_B.double().abs().T) * 2.0**-7
            _check(f"layer {shape}", direct, ref, x2, w64, extra=term + layer.bias.double().abs() * 2.0**-8)


def test_qalora_term_on_the_int4_base():
    """QA-LoRA's layer call in bfloat16 (the INT4 base, A [r, groups] over x averaged per group
    times groups): h from x's values in float32, the base in bfloat16 dot products."""
    G, K, N, r = 64, 512, 45, 8
    wq = INT4Weight.quantize(torch.randn(N, K) / 20, G)
    w64 = _bf16_weight(wq)
    for M in (1, 4, 11):
        x = torch.randn(M, K).to(torch.bfloat16)
        A = (torch.randn(r, K // G) / 3).to(torch.bfloat16)
        B = (torch.randn(N, r) / 3).to(torch.bfloat16)
        y, h = native.cpu_qlora_forward(x, wq.native_view(), None, A, B, 0.5, pool=G)
        pooled = x.double().reshape(M, K // G, G).mean(-1) * (K // G)
        h64 = pooled @ A.double().T
        assert torch.allclose(h.double(), h64, rtol=2.0**-8, atol=2.0**-8 * float(h64.abs().max())), M
        ref = x.double() @ w64.T + 0.5 * h64 @ B.double().T
        one_flip = (x.double().abs() @ w64.abs().T) * 2.0**-8 / 8
        term = 0.5 * (h64.abs() @ B.double().abs().T) * 2.0**-16
        _check(f"qalora M={M}", y, ref, x, w64, extra=one_flip + term)
