"""The base-weight interface (lorakern.ops.bases): a dense W and an NF4 W holding the same values
answer every method alike, on every backend the NF4 base has, so a LoRA body written against the
interface computes the same thing on either."""

import pytest
import torch

from lorakern import NF4Weight
from lorakern.nf4 import native
from lorakern.ops.bases import DenseBase, NF4Base

BACKENDS = ["reference"] + (["native"] if native.unavailable_reason(torch.device("cpu")) is None else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("M", [1, 5, 40])  # the fused small-M kernels (M <= 16) and the tiled decode
def test_nf4_base_answers_as_the_dense_base_of_its_values(backend, double_quant, M):
    torch.manual_seed(M)
    out_f, in_f = 37, 130  # odd: rows and columns cut blocks of 64
    nf4 = NF4Base(NF4Weight.quantize(torch.randn(out_f, in_f), 64, double_quant))
    W = nf4.w.dequantize_reference(torch.float32)
    dense = DenseBase(W)
    x, dy, bias = torch.randn(M, in_f), torch.randn(M, out_f), torch.randn(out_f)

    assert nf4.shape == dense.shape == (out_f, in_f)
    assert torch.equal(nf4.dequantize(torch.float32, backend), dense.dequantize(torch.float32))
    assert torch.equal(nf4.dequantize(torch.bfloat16, backend), W.to(torch.bfloat16))
    if backend == "native":  # tiles: what the tiled matmul decodes into its buffer
        got = nf4.dequantize_rows(11, torch.empty(9, in_f))
        assert torch.equal(got, dense.dequantize_rows(11, torch.empty(9, in_f)))
    tol = dict(rtol=1e-5, atol=1e-5)  # fp32 summation order only
    torch.testing.assert_close(nf4.matmul(x, False, backend), dense.matmul(x, False), **tol)
    torch.testing.assert_close(nf4.matmul(dy, True, backend), dense.matmul(dy, True), **tol)
    torch.testing.assert_close(nf4.linear(x, bias, backend), dense.linear(x, bias), **tol)
    torch.testing.assert_close(nf4.grad_input(dy, backend), dense.grad_input(dy), **tol)
    # What a pass over W reads: 4 bits a weight, one scale a block (fp32, or a byte plus the
    # nested fp32 scales per 256 blocks, the 256-entry code and the offset).
    numel, blocks = out_f * in_f, -(-out_f * in_f // 64)
    scales = blocks + 4 * (-(-blocks // 256) + 256 + 1) if double_quant else 4 * blocks
    assert nf4.nbytes == -(-numel // 2) + scales and dense.nbytes == 4 * numel


def test_nf4_base_computes_in_the_dtype_it_is_given():
    """bitsandbytes' compute_dtype: W decoded to it and one matmul in it, back in x's dtype."""
    torch.manual_seed(0)
    nf4 = NF4Base(NF4Weight.quantize(torch.randn(24, 64), 64))
    x, bias = torch.randn(3, 64), torch.randn(24)
    Wb = nf4.w.dequantize_reference(torch.bfloat16)
    want = torch.nn.functional.linear(x.bfloat16(), Wb, bias.bfloat16()).float()
    got = nf4.linear(x, bias, "reference", torch.bfloat16)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    dy = torch.randn(3, 24)
    assert torch.equal(nf4.grad_input(dy, "reference", torch.bfloat16), (dy.bfloat16() @ Wb).float())


@pytest.mark.skipif("native" not in BACKENDS, reason="lorakern._C not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fast", [False, True])
def test_half_x_above_small_m_computes_in_float32_where_half_gemm_is_slow(dtype, fast, monkeypatch):
    """On a CPU without half-precision dot products for x's dtype, the NF4 and INT4 bases take
    bfloat16 / float16 x above SMALL_M rows (both products) as float32, rounding the result once:
    the same bits as the float32 call, rounded; where the CPU has them, the half-precision tiles."""
    from lorakern import INT4Weight
    from lorakern.ops import bases

    monkeypatch.setitem(bases._fast_half, dtype, fast)
    torch.manual_seed(0)
    out_f, in_f, M = 70, 256, 40
    W = torch.randn(out_f, in_f)
    for base in (NF4Base(NF4Weight.quantize(W, 64)), bases.INT4Base(INT4Weight.quantize(W, 64))):
        x, dy = torch.randn(M, in_f).to(dtype), torch.randn(M, out_f).to(dtype)
        for a, transpose in ((x, False), (dy, True)):
            got = base.matmul(a, transpose, "native" if isinstance(base, NF4Base) else "auto")
            want32 = base.matmul(a.float(), transpose, "native" if isinstance(base, NF4Base) else "auto")
            tiled = base._tiled_matmul(a, transpose)
            assert got.dtype == dtype
            if fast:
                assert torch.equal(got, tiled), (type(base).__name__, transpose)
            else:
                assert torch.equal(got, want32.to(dtype)), (type(base).__name__, transpose)
            Wd = base.dequantize(torch.float64, "reference")
            ref = a.double() @ (Wd if transpose else Wd.t())
            err = (got.double() - ref).norm() / ref.norm()
            assert err < (4e-3 if dtype == torch.bfloat16 else 5e-4), (type(base).__name__, transpose, err)
