"""The native NF4 kernels (lorakern._C) against the pure-torch reference, every CPU path forced."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

import pytest
import torch
from helpers import HUNG_S, assert_close_like_torch

from lorakern import NF4Weight, nf4_dequantize, nf4_matmul
from lorakern.backend import SMALL_M
from lorakern.nf4 import native
from lorakern.ops.bases import computes_in_float32

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (out, in, blocksize): in a multiple of 32 (the vector fast path; 96 an odd number of 64-blocks),
# in odd / not a multiple of the blocksize (blocks straddle rows, rows start mid-byte), in <
# blocksize, out = 1, blocksize 32; (40, 1088, 64): 680 blocks, so double quantization's groups of
# 256 blocks change mid-row, and in > 512 with a short last slice (the M > 2 walk's column slices);
# (23, 384, 128) and (10, 1024, 256): weight rows in pairs with 4 and 8 steps per block, odd out.
SHAPES = [(48, 256, 64), (33, 320, 128), (17, 53, 64), (9, 96, 64), (31, 40, 128), (1, 4096, 4096), (70, 64, 32),
          (40, 1088, 64), (23, 384, 128), (10, 1024, 256),
          (1001, 192, 64)]  # 63 row blocks, the last one short: pieces of several blocks, the last one short


def isas():
    C = native.extension()
    return C.available_isas() if C is not None else []


def test_extension_is_built_where_a_compiler_exists():
    # CI has g++: a silently skipped native build would make every test below vacuous.
    if shutil.which("c++") or shutil.which("g++"):
        assert native.extension() is not None, native.unavailable_reason(torch.device("cpu"))
        assert "scalar" in isas()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bit_exact(isa, dtype, double_quant):
    for out_f, in_f, bs in SHAPES:
        w = NF4Weight.quantize(torch.randn(out_f, in_f, dtype=dtype), bs, double_quant)
        for out_dtype in DTYPES:
            got = nf4_dequantize(w, out_dtype, backend="native")
            want = w.dequantize_reference(out_dtype)
            assert torch.equal(got, want), f"{isa} {(out_f, in_f, bs)} -> {out_dtype}"


def test_dequantize_any_start_and_count(isa):
    w = NF4Weight.quantize(torch.randn(13, 77), 32, double_quant=True)
    full = w.dequantize_reference(torch.float32).reshape(-1)
    for start, count in [(0, 1), (1, 31), (5, 64), (31, 33), (33, 900), (1000, 1)]:
        out = torch.empty(count)
        native.dequantize_into(w, out, start=start)
        assert torch.equal(out, full[start:start + count]), (start, count)


def _check_matmul(w, x, transpose, dtype, where):
    w64 = w.dequantize_reference(torch.float64)
    ref = x.double() @ (w64 if transpose else w64.t())
    torch_same = x @ (w.dequantize_reference(dtype) if transpose else w.dequantize_reference(dtype).t())
    got = nf4_matmul(x, w, transpose=transpose, backend="native")
    assert got.dtype == dtype
    assert_close_like_torch(where, got, ref, torch_same, dtype)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_vs_float64(isa, dtype, double_quant, transpose):
    for out_f, in_f, bs in SHAPES:
        w = NF4Weight.quantize(torch.randn(out_f, in_f) / in_f**0.5, bs, double_quant)
        k = out_f if transpose else in_f
        # fused kernel up to SMALL_M (8-row tiles below 11 rows, 14 with AVX-512; 16-row micro-tiles
        # from there, padded below 16), tiled above
        for M in (1, 2, 3, 8, 10, 11, 13, 14, SMALL_M, SMALL_M + 1, 40):
            x = torch.randn(M, k, dtype=dtype)
            _check_matmul(w, x, transpose, dtype, f"{isa} {(out_f, in_f, bs)} M={M} T={transpose}")


def test_double_quant_gives_the_bits_of_its_decoded_scales(isa):
    """Double quantization changes where a block's scale comes from (a per-group table read as the
    walk enters the group, or an array decoded per row block with gathers), never the sums: the
    product with the double-quantized weight has the bits of the product with the same packed bytes
    and the decoded float32 scales as plain absmax, at every tile size and past 16 rows, both ways,
    on every ISA. Groups of 256 blocks straddle rows (1088 columns: 17 blocks a row) and row blocks
    of 16 rows, rows hold fractions of a block (320 columns, blocksize 128), and last groups are short."""
    for out_f, in_f, bs in ((40, 1088, 64), (33, 320, 128), (9, 14336, 64), (37, 4160, 64)):
        dq = NF4Weight.quantize(torch.randn(out_f, in_f) / in_f**0.5, bs, double_quant=True)
        plain = NF4Weight(dq.packed, dq.absmax_float(), dq.shape, dq.dtype, bs)
        for transpose in (False, True):
            for M in (*range(1, 17), 40):
                x = torch.randn(M, out_f if transpose else in_f)
                got = nf4_matmul(x, dq, transpose=transpose, backend="native")
                want = nf4_matmul(x, plain, transpose=transpose, backend="native")
                assert torch.equal(got, want), f"{isa} {(out_f, in_f, bs)} M={M} transpose={transpose}"


def test_matmul_empty_3d_and_noncontiguous():
    w = NF4Weight.quantize(torch.randn(24, 128), 64)
    assert nf4_matmul(torch.randn(0, 128), w, backend="native").shape == (0, 24)
    x = torch.randn(2, 3, 256)[..., ::2]  # 3-D, non-contiguous
    got = nf4_matmul(x, w, backend="native")
    want = x.double() @ w.dequantize_reference(torch.float64).t()
    assert got.shape == (2, 3, 24)
    assert (got.double() - want).abs().max() < 1e-5


def test_opcheck():
    w = NF4Weight.quantize(torch.randn(24, 128), 64, double_quant=True)
    args = (w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize)
    for backend in ("reference", "native"):
        torch.library.opcheck(torch.ops.lorakern.nf4_dequantize, (*args, [24, 128], torch.bfloat16, backend))
        for M, transpose in ((3, False), (3, True), (40, False)):
            x = torch.randn(M, 24 if transpose else 128)
            torch.library.opcheck(torch.ops.lorakern.nf4_matmul, (x, *args, 24, 128, transpose, backend))


def test_errors(monkeypatch):
    w = NF4Weight.quantize(torch.randn(24, 128), 64)
    with pytest.raises(ValueError, match="x: expected last dim 128"):
        nf4_matmul(torch.randn(3, 100), w)
    with pytest.raises(TypeError, match="x: expected a float16, bfloat16 or float32"):
        nf4_matmul(torch.randn(3, 128).double(), w)
    with pytest.raises(ValueError, match="backend must be one of"):
        nf4_matmul(torch.randn(3, 128), w, backend="cuda")
    with pytest.raises(TypeError, match="weight: expected an lorakern.NF4Weight"):
        nf4_matmul(torch.randn(3, 128), torch.randn(24, 128))
    monkeypatch.setenv(native.ISA_ENV, "avx9000")
    with pytest.raises(RuntimeError, match="LORAKERN_CPU_ISA='avx9000'"):
        nf4_matmul(torch.randn(3, 128), w, backend="native")


def test_without_the_extension_auto_falls_back_once_and_native_raises(monkeypatch):
    # As after an install on a machine without a C++ compiler: lorakern._C is missing.
    from lorakern import backend

    monkeypatch.setattr(native, "_loaded", [(None, "lorakern._C is not built (test)")])
    monkeypatch.setattr(backend, "_warned", set())
    w = NF4Weight.quantize(torch.randn(24, 128), 64)
    x = torch.randn(3, 128)
    with pytest.warns(UserWarning, match="NF4 uses the pure-torch reference path .*not built"):
        got = nf4_matmul(x, w)
    torch.testing.assert_close(got, x @ w.dequantize_reference().t())
    with pytest.raises(RuntimeError, match="backend='native' cannot serve cpu tensors: lorakern._C is not built"):
        nf4_matmul(x, w, backend="native")


def test_cpu_only_build_names_the_fix_for_cuda(monkeypatch):
    from lorakern.backend import resolve_nf4

    C = native.extension()
    if C is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(C, "with_cuda", False)
    with pytest.raises(RuntimeError, match="built without CUDA .*CUDA_HOME"):
        resolve_nf4("native", torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dequantize_bit_exact_and_gemv(dtype, double_quant):
    if native.unavailable_reason(torch.device("cuda")) is not None:
        pytest.fail(native.unavailable_reason(torch.device("cuda")))
    for out_f, in_f, bs in SHAPES:
        w = NF4Weight.quantize(torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5, bs, double_quant)
        wc = w.to("cuda")
        for out_dtype in DTYPES:
            got = nf4_dequantize(wc, out_dtype, backend="native")
            assert torch.equal(got.cpu(), w.dequantize_reference(out_dtype)), (out_f, in_f, bs, out_dtype)
        for M in (1, 3, 8, 9, SMALL_M, SMALL_M + 1, 64):
            for transpose in (False, True):
                x = torch.randn(M, out_f if transpose else in_f, dtype=dtype, device="cuda")
                w64 = wc.dequantize_reference(torch.float64)
                ref = x.double() @ (w64 if transpose else w64.t())
                same = x @ (wc.dequantize_reference(dtype) if transpose else wc.dequantize_reference(dtype).t())
                got = nf4_matmul(x, wc, transpose=transpose, backend="native")
                assert_close_like_torch(f"cuda {(out_f, in_f, bs)} M={M} T={transpose}", got, ref, same, dtype)


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_forward_in_one_call_vs_float64(isa, double_quant):
    # The small-M CPU forward with the LoRA term and bias folded into the kernel: tiles of 8 rows of
    # x with weight rows in pairs, remainder tiles, r below / at / across the vector width, no bias.
    s = 0.7
    for out_f, in_f, bs in SHAPES:
        w = NF4Weight.quantize(torch.randn(out_f, in_f) / in_f**0.5, bs, double_quant)
        w64 = w.dequantize_reference(torch.float64)
        for M, r, with_bias in ((1, 16, True), (2, 1, True), (3, 17, False), (8, 8, True), (9, 40, True),
                                (12, 40, True), (14, 3, True), (SMALL_M, 16, False), (5, 256, True),
                                (SMALL_M, 256, False)):
            x = torch.randn(M, in_f)
            A = torch.randn(r, in_f) / in_f**0.5
            B = torch.randn(out_f, r) / r**0.5
            bias = torch.randn(out_f) if with_bias else None
            y, h = native.cpu_qlora_forward(x, w, bias, A, B, s)

            def forward(x, A, B, bias, wt):
                h = x @ A.t()
                y = x @ wt.t() + s * (h @ B.t())
                return (y if bias is None else y + bias), h

            want = forward(x.double(), A.double(), B.double(), None if bias is None else bias.double(), w64)
            same = forward(x, A, B, bias, w64.float())
            where = f"{isa} {(out_f, in_f, bs)} M={M} r={r} bias={with_bias}"
            assert_close_like_torch(f"y {where}", y, want[0], same[0], torch.float32)
            assert_close_like_torch(f"h {where}", h, want[1], same[1], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_call_is_the_float32_call_rounded(isa, dtype):
    """A bfloat16 / float16 x (with A, B, bias of its dtype) is converted to float32 inside the one
    native call and y, h rounded once: the same bits as the float32 call on the same values, then
    ``.to(dtype)``, for the forward with the LoRA term, the plain x W^T and x W (every M path:
    one row, 8-row tiles, the 16-row micro-tiles above SMALL_M), odd shapes and sizes that are not
    a multiple of the conversions' 8-wide steps; large outputs overflow float16 to inf as torch's
    rounding does."""
    cases = (((33, 320, 128), 1, 16, True, False), ((17, 53, 64), 3, 5, False, False),
             ((48, 256, 64), SMALL_M, 16, True, False), ((70, 64, 32), 40, 8, True, False),
             ((1001, 192, 64), 2, 256, True, False), ((9, 96, 64), 5, 3, True, True))
    for (out_f, in_f, bs), M, r, with_bias, big in cases:
        w = NF4Weight.quantize(torch.randn(out_f, in_f) / (1.0 if big else in_f**0.5), bs, double_quant=M == 3)
        x = (torch.randn(M, in_f) * (5e3 if big else 1.0)).to(dtype)  # finite; y ~ 4e4, past 65504 in part
        A = (torch.randn(r, in_f) / in_f**0.5).to(dtype)
        B = (torch.randn(out_f, r) / r**0.5).to(dtype)
        bias = torch.randn(out_f).to(dtype) if with_bias else None
        where = f"{isa} {dtype} {(out_f, in_f, bs)} M={M} r={r}"
        y, h = native.cpu_qlora_forward(x, w, bias, A, B, 0.7)
        y32, h32 = native.cpu_qlora_forward(x.float(), w, None if bias is None else bias.float(), A.float(),
                                            B.float(), 0.7)
        assert y.dtype == h.dtype == dtype, where
        assert torch.equal(y, y32.to(dtype)) and torch.equal(h, h32.to(dtype)), where
        # A float32 adapter and / or bias beside the half x (PEFT's on a 16-bit model): read as
        # they are, h in float32, y the float32 call's rounded once.
        for fp32_adapter, fp32_bias in ((True, False), (False, True), (True, True)):
            A_, B_ = (A.float(), B.float()) if fp32_adapter else (A, B)
            bias_ = None if bias is None else (bias.float() if fp32_bias else bias)
            ym, hm = native.cpu_qlora_forward(x, w, bias_, A_, B_, 0.7)
            assert ym.dtype == dtype and hm.dtype == A_.dtype, where
            assert torch.equal(ym, y32.to(dtype)) and torch.equal(hm, h32.to(hm.dtype)), where
        if big and dtype == torch.float16:
            assert y.isinf().any(), where  # the case must reach float16's overflow
        for transpose in (False, True):
            xt = x if not transpose else (torch.randn(M, out_f)).to(dtype)
            got = native.cpu_matmul(xt, w, transpose)
            assert got.dtype == dtype and torch.equal(got, native.cpu_matmul(xt.float(), w, transpose).to(dtype)), (
                f"{where} transpose={transpose}")


def test_adapter_and_bias_dtypes_are_checked():
    """The native call takes an adapter and a bias of x's dtype, or float32 beside a half x; any
    other pairing raises (naming the arguments) instead of reading the bytes as another dtype."""
    w = NF4Weight.quantize(torch.randn(32, 64), 32)
    x = torch.randn(2, 64)
    y, h = torch.empty(2, 32), torch.empty(2, 4)
    A, B = torch.randn(4, 64), torch.randn(32, 4)
    lora = (A.data_ptr(), B.data_ptr(), 0, 1.0, 4, h.data_ptr(), 0)
    args = (native.weight_args(w, 32, 64), x.data_ptr(), 2, y.data_ptr(), False, "scalar", 1, lora)
    for kwargs in (dict(x_dtype=0, lora_dtype=1), dict(x_dtype=0, bias_dtype=2), dict(x_dtype=1, lora_dtype=2),
                   dict(x_dtype=2, bias_dtype=1)):
        with pytest.raises(ValueError, match="lora_dtype and bias_dtype"):
            native.extension().cpu_matmul(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_finite_half_value_survives_the_conversions(isa, dtype):
    """Every finite bfloat16 / float16 value (subnormals included) through x -> float32 -> the
    kernel -> y: with W the identity (NF4's 1.0 and 0.0 codes, absmax 1) y = x, so the load and
    the rounding store are exact inverses on every value (-0 sums to +0: compared by value)."""
    n = 32
    w = NF4Weight.quantize(torch.eye(n), 32)
    assert torch.equal(w.dequantize_reference(torch.float32), torch.eye(n))
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[values.isfinite()]
    x = torch.cat([values, values.new_zeros((-values.numel()) % n)]).reshape(-1, n)
    for rows in (x[:1], x[:SMALL_M], x):  # 1 row, the small-M tiles, the micro-tile path
        got = native.cpu_matmul(rows, w, False)
        assert torch.equal(got, rows), f"{isa} {dtype} M={rows.shape[0]}"


def test_long_rows_vs_float64(isa):
    """14336 columns at every small M: the 8-row tiles' accumulators restart at each slice of
    columns (one accumulator a row in the scalar build summed all 14336 products in a row before:
    7x torch's float32 error at M = 12), with the one-call LoRA term at r = 256."""
    w = NF4Weight.quantize(torch.randn(24, 14336) / 14336**0.5, 64)
    w64 = w.dequantize_reference(torch.float64)
    for M in (1, 2, 5, 8, 12, SMALL_M):
        x = torch.randn(M, 14336)
        where = f"{isa} M={M}"
        assert_close_like_torch(where, native.cpu_matmul(x, w, False), x.double() @ w64.t(), x @ w64.float().t(),
                                torch.float32)
        A, B = torch.randn(256, 14336) / 14336**0.5, torch.randn(24, 256) / 16
        y, h = native.cpu_qlora_forward(x, w, None, A, B, 0.7)
        h64 = x.double() @ A.double().t()
        assert_close_like_torch(f"y {where}", y, x.double() @ w64.t() + 0.7 * h64 @ B.double().t(),
                                x @ w64.float().t() + 0.7 * (x @ A.t()) @ B.t(), torch.float32)
        assert_close_like_torch(f"h {where}", h, h64, x @ A.t(), torch.float32)


_SLICE_SCRIPT = """
import os, sys, torch
from lorakern import NF4Weight
from lorakern.nf4 import native
torch.manual_seed(0)
out = []
for isa in native.extension().available_isas():
    os.environ[native.ISA_ENV] = isa
    for dq in (False, True):
        w = NF4Weight.quantize(torch.randn(9, 45120) / 45120**0.5, 64, dq)
        for M in (3, 5, 8, 10):
            x = torch.randn(M, 45120)
            out.append(native.cpu_matmul(x, w, False))
            A, B = torch.randn(16, 45120) / 200, torch.randn(9, 16)
            out.append(native.cpu_qlora_forward(x, w, torch.randn(9), A, B, 0.5)[0])
torch.save(out, sys.argv[1])
"""


def test_the_l2_size_does_not_change_the_bits(tmp_path):
    """From 3 rows of x the kernel walks the x panel in slices sized to the L2 cache (sysconf, or
    $LORAKERN_CPU_L2_BYTES), while each row's sums restart at fixed columns: the smallest (64 KB)
    and largest (512 KB) slices give the same bits, every ISA, over 45120 columns (several slices
    either way, an unpaired last weight row, double quantization, the one-call LoRA term)."""
    import subprocess

    results = []
    for l2 in (1 << 16, 1 << 24):
        path = tmp_path / f"l2_{l2}.pt"
        env = dict(os.environ, LORAKERN_CPU_L2_BYTES=str(l2))
        subprocess.run([sys.executable, "-c", _SLICE_SCRIPT, str(path)], env=env, check=True, timeout=HUNG_S)
        results.append(torch.load(path))
    assert len(results[0]) == len(results[1]) > 0
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"result {i}: 64 KB and 512 KB panel slices differ"


def test_long_rows_many_slices_vs_float64(isa):
    """45120 columns (a 70B model's MLP width is 28672) at M = 3 to 10: several panel slices and
    restarts of the sums on any L2 size, pairs of weight rows and an unpaired last one, within
    torch's float32 error."""
    for dq in (False, True):
        w = NF4Weight.quantize(torch.randn(9, 45120) / 45120**0.5, 64, dq)
        w64 = w.dequantize_reference(torch.float64)
        for M in (3, 5, 8, 10):
            x = torch.randn(M, 45120)
            assert_close_like_torch(f"{isa} dq={dq} M={M}", native.cpu_matmul(x, w, False), x.double() @ w64.t(),
                                    x @ w64.float().t(), torch.float32)


def test_transposed_product_over_many_weight_rows_vs_float64(isa):
    """dY W (the QLoRA backward's dx) sums over all out_features rows of W: 4096, 14336 (a Llama
    MLP) and 45120, within 2x torch's float32 error. One running sum per output over the rows was
    8x-10x torch's error at M = 8 from 4096 rows; the sums now restart every 256 rows (spans ending
    mid-span: 4096 + 100 rows; groups of 64 rows ending mid-group). Rows of dY: 1 to 16 (tiles
    decoding in the loop up to 8 rows, 2 on AVX2), tiles of 8 or 3, some with a short last one (9, 23, 32, 40),
    and past 256 rows (300: two passes over W, the second of 44 rows)."""
    for rows in (4196, 14336, 45120):
        w = NF4Weight.quantize(torch.randn(rows, 256) / rows**0.5, 64, rows == 4196)
        w32 = w.dequantize_reference(torch.float32)
        for M in (1, 2, 3, 8, 9, 16, 23, 32, 40) + ((300,) if rows == 4196 else ()):
            x = torch.randn(M, rows)
            assert_close_like_torch(f"{isa} rows={rows} M={M}", native.cpu_matmul(x, w, True),
                                    x.double() @ w32.double(), x @ w32, torch.float32)


def test_transposed_product_rows_the_kernel_takes(isa, monkeypatch):
    """dY W: the native kernel at any number of rows of dY (float32, or half dY where the CPU's half
    GEMM is slower: converted inside the call; AVX2 / AVX-512, in_features % 32 == 0), as x W^T; W
    decoded in row tiles for torch's GEMM on the scalar build and where in_features is not a
    multiple of 32; within 2x torch's error both ways (NF4 and QA-LoRA's INT4 base)."""
    from lorakern import INT4Weight
    from lorakern.ops.bases import INT4Base, NF4Base

    calls, real = [], native.cpu_matmul
    monkeypatch.setattr(native, "cpu_matmul", lambda *a: calls.append(a[2]) or real(*a))
    nf4 = NF4Weight.quantize(torch.randn(70, 96) / 70**0.5, 32)
    int4 = INT4Weight.quantize(torch.randn(70, 96) / 70**0.5, 32)
    odd = NF4Weight.quantize(torch.randn(70, 100) / 70**0.5, 64)  # 100 columns: no INT4 (groups of 32-128 columns)
    for cols, base, w32 in ((96, NF4Base(nf4), nf4.dequantize_reference(torch.float32)),
                            (96, INT4Base(int4), int4.dequantize(torch.float32)),
                            (100, NF4Base(odd), odd.dequantize_reference(torch.float32))):
        for M in (SMALL_M + 1, 32, 40, 300):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                dy = torch.randn(M, 70).to(dtype)
                calls.clear()
                got = base.matmul(dy, True)
                half_fast = dtype != torch.float32 and not computes_in_float32(dy)
                takes = isa != "scalar" and cols % 32 == 0 and not half_fast
                assert calls == ([True] if takes else []), (isa, cols, M, dtype)
                assert_close_like_torch(f"{isa} {type(base).__name__} cols={cols} M={M} {dtype}", got,
                                        dy.double() @ w32.double(), dy @ w32.to(dtype), dtype)


@pytest.mark.parametrize("double_quant", [False, True])
def test_many_rows_in_the_native_kernel_vs_float64(isa, double_quant, monkeypatch):
    """Above 16 rows the CPU's float32 x W^T is the native kernel too (AVX2 / AVX-512): 16-row tiles (the last one
    padded) sharing each decoded slice, rows taken in chunks of a few MB of x (at 14336 columns 64
    rows a chunk, so 150 rows are three chunks, the last a short padded tile); with the LoRA term,
    bias and one adapter of rank 1 to 256 (the layers' one call above 16 rows), and with several
    adapters (each chunk reads its own rows of h and of the adapter index; the layers add those in
    torch above 16 rows, but the kernel takes them)."""
    from lorakern.ops.bases import NF4Base, computes_in_float32

    calls, real = [], native.cpu_matmul
    monkeypatch.setattr(native, "cpu_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    for out_f, in_f, bs in ((33, 320, 128), (1001, 192, 64), (70, 14336, 64), (40, 1088, 64)):
        w = NF4Weight.quantize(torch.randn(out_f, in_f) / in_f**0.5, bs, double_quant)
        w64 = w.dequantize_reference(torch.float64)
        for M in (17, 140, 150, 300):
            where = f"{isa} {(out_f, in_f, bs)} M={M}"
            x = torch.randn(M, in_f)
            calls.clear()
            got = nf4_matmul(x, w, backend="native")
            # one native call, no dequantized tiles; the plain C++ build keeps the tiles + BLAS
            assert calls == ([] if isa == "scalar" else [(M, in_f)]), where
            xb = x.to(torch.bfloat16)
            assert NF4Base(w).matmul(xb, False).dtype == torch.bfloat16
            # bfloat16 x: the tiled path (torch's bf16 GEMM) where the CPU has bfloat16 dot
            # products, else the native kernel in float32 (an AVX2-only CPU)
            want = (isa != "scalar") * (2 if computes_in_float32(xb) else 1)
            assert len(calls) == want, f"bfloat16 x: {where}"
            if M == 17:
                odd = NF4Weight.quantize(torch.randn(out_f, 77), 32)  # in % 32 != 0: tiles + BLAS
                got_odd = nf4_matmul(x[:, :77], odd, backend="native")
                assert len(calls) == want, "in_features % 32 != 0 keeps the tiled path"
                w77 = odd.dequantize_reference(torch.float64)
                assert_close_like_torch(f"odd {where}", got_odd, x[:, :77].double() @ w77.t(),
                                        x[:, :77] @ w77.float().t(), torch.float32)
            assert_close_like_torch(where, got, x.double() @ w64.t(), x @ w64.float().t(), torch.float32)
            # One adapter: h in register tiles of 4 rows x 2 or 4 ranks (edges one dot at a time), the
            # term after each chunk's base in column blocks (a chunk of 16 rows or fewer, as 140's
            # last at 14336 columns: beside the base, as at small M).
            for r in (1, 9, 40, 256):
                A, B, bias = torch.randn(r, in_f) / in_f**0.5, torch.randn(out_f, r) / r**0.5, torch.randn(out_f)
                y, h = native.cpu_qlora_forward(x, w, bias, A, B, 0.7)
                h64 = x.double() @ A.double().t()
                want = x.double() @ w64.t() + bias.double() + 0.7 * h64 @ B.double().t()
                same = x @ w64.float().t() + bias + 0.7 * (x @ A.t()) @ B.t()
                assert_close_like_torch(f"y {where} r={r}", y, want, same, torch.float32)
                assert_close_like_torch(f"h {where} r={r}", h, h64, x @ A.t(), torch.float32)
            As = [torch.randn(r, in_f) / in_f**0.5 for r in (4, 16)]
            Bs = [torch.randn(out_f, r) / r**0.5 for r in (4, 16)]
            index = torch.randint(-1, 2, (M,), generator=torch.Generator().manual_seed(M))
            y = native.cpu_multi_forward(x, w, bias, As, Bs, [0.5, 2.0], index)
            want, same = x.double() @ w64.t() + bias.double(), x @ w64.float().t() + bias
            for m in range(M):
                a = int(index[m])
                if a >= 0:
                    s = [0.5, 2.0][a]
                    want[m] += s * (x[m].double() @ As[a].double().t()) @ Bs[a].double().t()
                    same[m] += s * (x[m] @ As[a].t()) @ Bs[a].t()
            assert_close_like_torch(f"multi {where}", y, want, same, torch.float32)


# -- threads: the CPU kernels hand out their loops in pieces (csrc/cpu/thread_pool.cpp) ---------

def _native_results(w, seed=0):
    """Everything the CPU kernels compute on ``w``: whole dequantizes, a dequantize from inside a
    row (what the tiled matmul above SMALL_M decodes; its GEMM is torch's, whose sums may follow the
    thread count), the fused matmul in both directions and above 16 rows (dY W past 256 rows), and
    the one-call QLoRA forward at 16 rows (h one dot per (m, j)) and at 70 (h in register tiles,
    the term after each chunk's base)."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = w.shape
    got = [nf4_dequantize(w, dt, backend="native") for dt in (torch.float32, torch.bfloat16)]
    got.append(native.dequantize_into(w, torch.empty(min(20000, out_f * in_f - 77)), start=77))
    for M in (1, 5, SMALL_M):
        for transpose in (False, True):
            got.append(nf4_matmul(torch.randn(M, out_f if transpose else in_f, generator=g), w, transpose,
                                  backend="native"))
    got.append(native.cpu_matmul(torch.randn(70, in_f, generator=g), w, False))
    got.append(native.cpu_matmul(torch.randn(300, out_f, generator=g), w, True))  # dY W: 8-row tiles, 2 passes
    A, B = torch.randn(64, in_f, generator=g), torch.randn(out_f, 64, generator=g)
    for M in (SMALL_M, 70):
        x = torch.randn(M, in_f, generator=g)
        got += list(native.cpu_qlora_forward(x, w, torch.randn(out_f, generator=g), A, B, 0.5))
    return got


def _use_team(team, monkeypatch):
    """Run the native loops on `team` ($LORAKERN_CPU_TEAM), skipping "openmp" where torch's
    OpenMP runtime is absent (test_openmp_team_is_found says where it must be present)."""
    if team == "openmp" and not native.extension().openmp_team_available():
        pytest.skip("torch's OpenMP runtime not found in this process")
    monkeypatch.setenv(native.TEAM_ENV, team)


@pytest.mark.parametrize("team", native.TEAMS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_thread_count_gives_the_same_bits(isa, double_quant, team, monkeypatch):
    """Each output is computed by one piece, whoever takes it: 1, 2 and 3 threads (more than this
    machine may have cores) give the same bits, on shapes with many pieces of every loop, with
    lorakern's pool, torch's OpenMP team or the choice between them; and the team asked for runs
    the loops."""
    _use_team(team, monkeypatch)
    C = native.extension()
    previous = torch.get_num_threads()
    before = C.cpu_team_loops()
    try:
        for out_f, in_f, bs in ((300, 1088, 64), (37, 4160, 64), (45, 77, 32), (1001, 256, 64)):  # 77: the any-K path
            w = NF4Weight.quantize(torch.randn(out_f, in_f) / in_f**0.5, bs, double_quant)
            torch.set_num_threads(1)
            want = _native_results(w)
            for threads in (2, 3):
                torch.set_num_threads(threads)
                for i, (a, b) in enumerate(zip(_native_results(w), want)):
                    assert torch.equal(a, b), f"{isa} {team} {(out_f, in_f)} result {i}: {threads} threads != 1"
    finally:
        torch.set_num_threads(previous)
    ran = [after - b for after, b in zip(C.cpu_team_loops(), before)]
    if team == "auto":
        assert ran[1] + ran[2] > 0, ran
    else:
        assert (ran[1] > 0, ran[2] > 0) == (team == "pool", team == "openmp"), ran


def _spinning_threads() -> list[int]:
    """This process's threads other than the caller in state R (running or runnable)."""
    me = threading.get_native_id()
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        if int(tid) != me and stat[stat.rindex(")") + 2] == "R":
            out.append(int(tid))
    return out


def test_auto_team_follows_torchs_openmp_threads(monkeypatch):
    """$LORAKERN_CPU_TEAM=auto (the default): right after a parallel torch op, while torch's OpenMP
    workers spin, a call's loops run on that team; once they sleep, on lorakern's pool. The
    machine decides when a worker spins or is preempted, so each side is tried until it is seen
    (20 times at most); an auto team that never picks one side fails."""
    if not (sys.platform.startswith("linux") and native.extension().openmp_team_available()):
        pytest.skip("torch's OpenMP runtime not found in this process")
    if os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("torch's OpenMP workers do not spin then sleep here (wait policy set, or one core)")
    monkeypatch.delenv(native.TEAM_ENV, raising=False)
    assert native.DEFAULT_TEAM == "auto"
    C = native.extension()
    w = NF4Weight.quantize(torch.randn(512, 2048), 64)
    x, big = torch.randn(16, 2048), torch.randn(1 << 20)
    previous = torch.get_num_threads()
    seen = {"openmp": False, "pool": False}
    try:
        torch.set_num_threads(2)
        nf4_matmul(x, w)  # the first call records the team's workers
        for _ in range(20):
            big.mul_(1.0)  # 1M elements: torch runs it on its OpenMP threads, which then spin
            before = C.cpu_team_loops()
            nf4_matmul(x, w)
            ran = [after - b for after, b in zip(C.cpu_team_loops(), before)]
            if ran[2] > 0:
                seen["openmp"] = True
                break
        deadline = time.monotonic() + HUNG_S
        for _ in range(20):
            while _spinning_threads():  # libgomp's workers spin a few ms, lorakern's 50 us
                assert time.monotonic() < deadline, f"threads {_spinning_threads()} never slept"
                time.sleep(0.002)
            before = C.cpu_team_loops()
            nf4_matmul(x, w)
            ran = [after - b for after, b in zip(C.cpu_team_loops(), before)]
            if ran[1] > 0 and ran[2] == 0:
                seen["pool"] = True
                break
    finally:
        torch.set_num_threads(previous)
    assert seen == {"openmp": True, "pool": True}, seen


def test_openmp_team_is_found():
    """Where torch runs its ops on OpenMP (the Linux wheels), the kernels find that runtime (not
    another copy): GOMP_parallel as libtorch_cpu resolves it."""
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("torch has no OpenMP runtime here")
    assert native.extension().openmp_team_available()


@pytest.mark.parametrize("value", ["1M", "-65536", "0", "abc", "2.5e5"])
def test_l2_env_is_checked(monkeypatch, value):
    """A malformed L2 size is an error naming the variable, before any kernel runs (the extension's
    strtoll would read "1M" as 1 byte and size its slices by the 64 KB floor, silently); a
    whole number of bytes is taken."""
    w = NF4Weight.quantize(torch.randn(64, 256), 64)
    x = torch.randn(3, 256)
    monkeypatch.setenv(native.L2_ENV, value)
    with pytest.raises(RuntimeError, match=f"LORAKERN_CPU_L2_BYTES='{value}': expected a whole number of bytes"):
        nf4_matmul(x, w, backend="native")
    monkeypatch.setenv(native.L2_ENV, "1048576")
    torch.testing.assert_close(nf4_matmul(x, w, backend="native"), x @ w.dequantize().t(), rtol=1e-5, atol=1e-5)


def test_team_env_is_checked(monkeypatch):
    """A team that is not one of the three, or OpenMP where it was not found, is an error naming
    the variable, before any kernel runs."""
    w = NF4Weight.quantize(torch.randn(64, 256), 64)
    x = torch.randn(3, 256)
    monkeypatch.setenv(native.TEAM_ENV, "gomp")
    with pytest.raises(RuntimeError, match="LORAKERN_CPU_TEAM='gomp': expected one of"):
        nf4_matmul(x, w, backend="native")
    monkeypatch.setenv(native.TEAM_ENV, "openmp")
    monkeypatch.setattr(native.extension(), "openmp_team_available", lambda: False)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="LORAKERN_CPU_TEAM=openmp: torch's OpenMP runtime is not usable"):
            nf4_matmul(x, w, backend="native")
        torch.set_num_threads(1)
        nf4_matmul(x, w, backend="native")  # one thread needs no team: no error
    finally:
        torch.set_num_threads(previous)


def _cpu_vendor() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def test_avx2_names_this_cpus_lookup(monkeypatch):
    """Two AVX2 lookups: "avx2" (and the default where AVX-512 is absent) is vpshufb on AMD and
    vpermps elsewhere; the C++ side resolves the name as the Python side does (same bits)."""
    have = isas()
    if "avx2-vpermps" not in have:
        pytest.skip("no AVX2 on this CPU / build")
    assert "avx2-vpshufb" in have and "avx2" not in have
    want = "avx2-vpshufb" if _cpu_vendor() == "AuthenticAMD" else "avx2-vpermps"
    assert [n for n in have if n.startswith("avx2-")][-1] == want
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    assert native.cpu_isa() == want
    w = NF4Weight.quantize(torch.randn(34, 256), 64)
    x = torch.randn(1, 256)
    args = native.weight_args(w, 34, 256)
    y_alias, y_named = torch.empty(1, 34), torch.empty(1, 34)
    native.extension().cpu_matmul(args, x.data_ptr(), 1, y_alias.data_ptr(), False, "avx2", 1)
    native.extension().cpu_matmul(args, x.data_ptr(), 1, y_named.data_ptr(), False, want, 1)
    assert torch.equal(y_alias, y_named)
    monkeypatch.setenv(native.ISA_ENV, "avx3")
    with pytest.raises(RuntimeError, match="LORAKERN_CPU_ISA='avx3'.*'avx2-vpshufb'.*'avx2'\\]"):
        native.cpu_isa()


@pytest.mark.parametrize("double_quant", [False, True])
def test_avx2_lookups_agree(monkeypatch, double_quant):
    """vpshufb sums a block's code-value products and scales the sum (M <= 2), vpermps scales each
    weight: not the same bits, both within float32 rounding of each other and of float64, at every
    blocksize (1 to 8 steps a block), with an unpaired last row (odd out) and M = 1, 2, 3."""
    if "avx2-vpermps" not in isas():
        pytest.skip("no AVX2 on this CPU / build")
    for out_f, in_f, bs in ((33, 512, 32), (33, 512, 64), (21, 1024, 128), (9, 2048, 256)):
        w = NF4Weight.quantize(torch.randn(out_f, in_f) / in_f**0.5, bs, double_quant)
        w64 = w.dequantize_reference(torch.float64)
        for M in (1, 2, 3):
            x = torch.randn(M, in_f)
            ref = x.double() @ w64.t()
            got = {}
            for name in ("avx2-vpermps", "avx2-vpshufb"):
                monkeypatch.setenv(native.ISA_ENV, name)
                got[name] = nf4_matmul(x, w, backend="native")
                assert (got[name].double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (name, out_f, in_f, bs, M)
            assert torch.allclose(got["avx2-vpermps"], got["avx2-vpshufb"], rtol=1e-5, atol=1e-6)


def test_decode_paths_give_the_same_bits(monkeypatch):
    """The vector decodes (AVX2's two permutes and a blend, which both AVX2 paths dequantize with;
    AVX-512's one permute) and the scalar one give the same bits, at every start and count (heads,
    whole 32-chunks, tails)."""
    w = NF4Weight.quantize(torch.randn(61, 333), 64, double_quant=True)
    outs = {}
    for name in isas():
        monkeypatch.setenv(native.ISA_ENV, name)
        outs[name] = [native.dequantize_into(w, torch.empty(count, dtype=dt), start=start)
                      for start, count in ((0, 61 * 333), (3, 4000), (64, 32), (1001, 17))
                      for dt in (torch.float32, torch.float16)]
    for name, got in outs.items():
        for a, b in zip(got, outs["scalar"]):
            assert torch.equal(a, b), f"{name} != scalar"


def test_concurrent_callers_share_the_pool():
    """Python threads calling the kernels at once (the GIL is released inside): one caller's loop
    runs on the pool, the others' on their own thread; every result is the one computed alone."""
    import threading

    w = NF4Weight.quantize(torch.randn(256, 512) / 512**0.5, 64)
    xs = [torch.randn(M, 512) for M in (1, 3, 16, 40)]
    want = [nf4_matmul(x, w, backend="native") for x in xs]
    bad = []

    def call(k):
        for _ in range(20):
            for x, ref in zip(xs, want):
                if not torch.equal(nf4_matmul(x, w, backend="native"), ref):
                    bad.append(k)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def _child_matmul(conn, packed, absmax, x):

    os.environ.pop(native.TEAM_ENV, None)  # the child's own choice
    w = NF4Weight(packed, absmax, [64, 256], torch.float32, 64)
    torch.set_num_threads(2)
    conn.send(nf4_matmul(x, w, backend="native").tolist())  # plain lists: no shared-memory handles


@pytest.mark.parametrize("team", native.TEAMS)
def test_kernels_run_in_a_forked_child(team, monkeypatch):
    """A child forked after the pool's or OpenMP's threads started (a DataLoader worker) has none
    of them: its calls still complete, on a pool it starts itself (libgomp would wait there for
    the parent's threads for ever, as torch's own parallel ops do in such a child)."""
    import multiprocessing as mp

    _use_team(team, monkeypatch)
    w = NF4Weight.quantize(torch.randn(64, 256), 64)
    x = torch.randn(3, 256)
    torch.set_num_threads(max(2, torch.get_num_threads()))
    want = nf4_matmul(x, w, backend="native")  # the parent's workers exist now
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_matmul, args=(child, w.packed, w.absmax, x))
    p.start()
    # A hang here is the bug (a child waiting for workers that do not exist): bounded wait.
    assert parent.poll(HUNG_S), "the forked child did not answer"
    assert torch.equal(torch.tensor(parent.recv()), want)
    p.join()
