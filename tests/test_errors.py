"""Bad input raises a clear error naming the argument."""

import pytest
import torch

import lorakern
from lorakern import FusedLoRALinear


def _args(**over):
    args = dict(
        x=torch.randn(4, 10), weight=torch.randn(6, 10), bias=torch.randn(6),
        lora_A=torch.randn(2, 10), lora_B=torch.randn(6, 2), scaling=1.0,
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(x=torch.randn(4, 9)), ValueError, "x: expected last dim in_features=10"),
        (dict(weight=torch.randn(6, 10, 1)), ValueError, "weight: expected 2-D"),
        (dict(lora_A=torch.randn(0, 10)), ValueError, "lora_A: expected 2-D .* r >= 1"),
        (dict(lora_A=torch.randn(2, 11)), ValueError, r"lora_A: expected shape \[r, 10\]"),
        (dict(lora_B=torch.randn(6, 3)), ValueError, r"lora_B: expected shape \[6, 2\]"),
        (dict(lora_B=torch.randn(5, 2)), ValueError, r"lora_B: expected shape \[6, 2\]"),
        (dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \[6\]"),
        (dict(lora_A=torch.randn(2, 10, dtype=torch.float64)), TypeError, "lora_A: expected dtype torch.float32"),
        (dict(x=torch.randint(0, 3, (4, 10))), TypeError, "x: expected a floating-point"),
        (dict(weight=torch.randn(6, 10, requires_grad=True)), ValueError, "weight: must be frozen"),
        (dict(scaling=float("nan")), ValueError, "scaling"),
    ],
)
def test_functional_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        lorakern.lora_linear(**_args(**over))


def test_dropout_and_backend_errors():
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\)"):
        lorakern.lora_linear(**_args(), dropout_p=1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        lorakern.lora_linear(**_args(), backend="cuda")


def test_explicit_triton_raises_when_it_cannot_serve(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot serve.*CUDA tensor"):
        lorakern.lora_linear(**_args(), backend="triton")


def test_auto_falls_back_and_warns_once(monkeypatch):
    from lorakern import backend

    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match="pure-torch reference path"):
        lorakern.lora_linear(**_args())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakern.lora_linear(**_args())


def test_fallback_warning_points_at_the_callers_line(monkeypatch):
    """The line printed under the warning is the user's call, not lorakern's (or torch's) source."""
    from lorakern import backend

    layer = lorakern.FusedLoRALinear(10, 6, r=2)
    for call in (lambda: lorakern.lora_linear(**_args()), lambda: layer(torch.randn(3, 10))):
        monkeypatch.setattr(backend, "_warned", set())
        with pytest.warns(UserWarning, match="pure-torch reference path") as record:
            call()
        assert [w.filename for w in record] == [__file__]


def test_rank_above_kernel_limit(monkeypatch):
    pytest.importorskip("triton")
    from lorakern.backend import triton_unavailable_reason

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_unavailable_reason(torch.randn(2, 4), 256) is None
    assert "rank r=300 is above the kernels' maximum of 256" in triton_unavailable_reason(torch.randn(2, 4), 300)
    assert "dtype torch.float64" in triton_unavailable_reason(torch.randn(2, 4, dtype=torch.float64), 8)
    with pytest.raises(RuntimeError, match="rank r=300"):
        lorakern.lora_linear(**_args(lora_A=torch.randn(300, 10), lora_B=torch.randn(6, 300)), backend="triton")


def test_module_errors():
    with pytest.raises(ValueError, match="r: expected an integer >= 1"):
        FusedLoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        FusedLoRALinear(4, 4, lora_dropout=-0.1)
    with pytest.raises(ValueError, match="init_lora_weights"):
        FusedLoRALinear(4, 4, init_lora_weights="pissa")


def test_non_tensor_arguments_are_named():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        lorakern.lora_linear([[1.0] * 10] * 4, **{k: v for k, v in _args().items() if k != "x"})
    for name in ("weight", "bias", "lora_A", "lora_B"):
        with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor, got list"):
            lorakern.lora_linear(**_args(**{name: [1.0]}))
    with pytest.raises(ValueError, match="scaling: expected a finite number, got '2'"):
        lorakern.lora_linear(**_args(scaling="2"))
    w = lorakern.NF4Weight.quantize(torch.randn(6, 64))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        lorakern.qlora_linear([[1.0] * 64], w, None, torch.randn(2, 64), torch.randn(6, 2), 1.0)
    with pytest.raises(TypeError, match="x: expected a float16, bfloat16 or float32 tensor"):
        lorakern.nf4_matmul([[1.0] * 64], w)


def _nf4(out=24, inp=128, double_quant=False):
    w = lorakern.NF4Weight.quantize(torch.randn(out, inp), 64, double_quant=double_quant)
    return w, (w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset, w.blocksize)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_public_nf4_ops_check_their_own_arguments(backend):
    """torch.ops.lorakern.* are public (torch.compile calls them): each checks x, the adapter and
    the weight against each other before any pointer reaches a kernel."""
    w, a = _nf4()
    op = torch.ops.lorakern
    bad_x = [
        ((torch.randn(3, 64), *a, 24, 128, False, backend), r"x: expected last dim 128 \(in_features\)"),
        ((torch.randn(3, 200), *a, 24, 128, False, backend), r"x: expected last dim 128 \(in_features\)"),
        ((torch.randn(3, 10), *a, 24, 128, True, backend), r"x: expected last dim 24 \(out_features\)"),
        ((torch.randn(2, 3, 128), *a, 24, 128, False, backend), r"x: expected a 2-D \[M, 128\] tensor"),
        ((torch.randn(3, 128), *a, 12, 256, False, backend), r"x: expected last dim 256 \(in_features\)"),
    ]
    for args, match in bad_x:
        with pytest.raises(ValueError, match=match):
            op.nf4_matmul(*args)
    with pytest.raises(TypeError, match="x: expected a float16, bfloat16 or float32"):
        op.nf4_matmul(torch.randn(3, 128, dtype=torch.float64), *a, 24, 128, False, backend)
    with pytest.raises(ValueError, match="packed: expected 3072 bytes"):
        op.nf4_matmul(torch.randn(3, 256), *a, 24, 256, False, backend)
    with pytest.raises(ValueError, match="backend: expected one of"):
        op.nf4_matmul(torch.randn(3, 128), *a, 24, 128, False, "auto")
    with pytest.raises(TypeError, match="dtype: expected float16, bfloat16 or float32"):
        op.nf4_dequantize(*a, [24, 128], torch.float64, backend)

    x, A, B, bias = torch.randn(3, 128), torch.randn(4, 128), torch.randn(24, 4), torch.randn(24)
    f32 = torch.float32

    def fwd(**over):
        kw = dict(x=x, bias=bias, A=A, B=B, in_features=128, base_dtype=f32, seed=None, p=0.0, backend=backend)
        kw.update(over)
        return op.qlora_fwd(kw["x"], *a, 24, kw["in_features"], kw["base_dtype"], kw["bias"], kw["A"], kw["B"],
                            1.0, kw["p"], kw["seed"], None, kw["backend"])

    y, h, _, _ = fwd()
    assert y.shape == (3, 24) and h.shape == (3, 4)
    for over, exc, match in [
        (dict(A=torch.randn(5, 16), B=torch.randn(24, 4)), ValueError, r"lora_A: expected shape \[r, 128\]"),
        (dict(B=torch.randn(24, 5)), ValueError, r"lora_B: expected shape \[24, 4\]"),
        (dict(x=torch.randn(3, 64)), ValueError, "x: expected last dim in_features=128"),
        (dict(in_features=64), ValueError, "packed: expected 768 bytes"),
        (dict(bias=torch.randn(12)), ValueError, r"bias: expected shape \[24\]"),
        (dict(x=torch.randn(3, 128, dtype=torch.bfloat16)), TypeError, "bias: expected dtype torch.bfloat16"),
        (dict(p=0.1), TypeError, "seed: expected a torch.Tensor"),
        (dict(p=0.1, seed=torch.tensor(1.5)), ValueError, "seed: expected a 0-d int64 tensor"),
        (dict(base_dtype=torch.float64), TypeError, "base_dtype: expected float16"),
        (dict(backend="auto"), ValueError, "backend: expected one of"),
    ]:
        with pytest.raises(exc, match=match):
            fwd(**over)
    dy = torch.randn(3, 24)

    def bwd(**over):
        kw = dict(dy=dy, x=x, A=A, B=B, h=h)
        kw.update(over)
        return op.qlora_bwd(kw["dy"], kw["x"], *a, 24, 128, f32, kw["A"], kw["B"], kw["h"], 1.0, 0.0, None,
                            None, torch.empty(0), torch.empty(0), True, True, True, backend)

    assert bwd()[0].shape == (3, 128)
    for over, match in [
        (dict(h=torch.randn(3, 5)), r"h: expected shape \[3, 4\]"),
        (dict(dy=torch.randn(2, 24)), r"dy: expected shape \[3, 24\]"),
        (dict(dy=torch.randn(3, 23)), r"dy: expected shape \[3, 24\]"),
        (dict(A=torch.randn(4, 64)), r"lora_A: expected shape \[r, 128\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            bwd(**over)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_dense_ops_check_their_own_arguments(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from lorakern.backend import triton_unavailable_reason

        if triton_unavailable_reason(torch.randn(1, 1), 1) is not None:
            pytest.skip("the Triton kernels cannot run here")
    op = torch.ops.lorakern
    x, W, b, A, B = torch.randn(4, 10), torch.randn(6, 10), torch.randn(6), torch.randn(2, 10), torch.randn(6, 2)
    for args, match in [
        ((x, W, b, torch.randn(2, 12), B), r"lora_A: expected shape \[r, 10\]"),
        ((x, W, b, A, torch.randn(7, 2)), r"lora_B: expected shape \[6, 2\]"),
        ((torch.randn(4, 9), W, b, A, B), "x: expected last dim in_features=10"),
        ((x, W, torch.randn(3), A, B), r"bias: expected shape \[6\]"),
        ((x[None], W, b, A, B), r"x: expected a 2-D \[M, in_features\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            op.lora_fwd(*args, 1.0, 0.0, None, None, backend)
    with pytest.raises(ValueError, match=r"backend: expected one of \('reference', 'triton'\)"):
        op.lora_fwd(x, W, b, A, B, 1.0, 0.0, None, None, "auto")
    y, h, z, n = op.lora_fwd(x, W, b, A, B, 1.0, 0.0, None, None, backend)
    dy = torch.randn(4, 6)
    assert op.lora_bwd(dy, x, W, A, B, h, 1.0, 0.0, None, None, z, n, True, True, True, backend)[0].shape == (4, 10)
    for args, match in [
        ((torch.randn(4, 5), x, W, A, B, h), r"dy: expected shape \[4, 6\]"),
        ((dy, x, W, A, B, torch.randn(4, 3)), r"h: expected shape \[4, 2\]"),
        ((dy, x, torch.randn(6, 9), A, B, h), "x: expected last dim in_features=9"),
    ]:
        with pytest.raises(ValueError, match=match):
            op.lora_bwd(*args, 1.0, 0.0, None, None, z, n, True, True, True, backend)


def test_one_backend_rule_for_every_op(monkeypatch):
    """backend.resolve: an explicit name runs or raises; "auto" takes the first preferred backend
    that can serve, says once which one it took instead and why, and is silent on meta tensors."""
    import warnings

    from lorakern import backend

    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setitem(backend.BACKENDS, "Op", ("reference", "native", "triton"))
    cpu = torch.device("cpu")
    reasons = {"triton": lambda: "no GPU", "native": lambda: None}
    with pytest.warns(UserWarning, match=r"lorakern: Op uses the native kernels \(lorakern._C\) \(no GPU\)"):
        assert backend.resolve("Op", "auto", cpu, ("triton", "native"), reasons) == "native"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per message
        assert backend.resolve("Op", "auto", cpu, ("triton", "native"), reasons) == "native"
        assert backend.resolve("Op", "auto", torch.device("meta"), ("triton",), reasons) == "reference"
        assert backend.resolve("Op", "native", cpu, ("triton",), reasons) == "native"
        assert backend.resolve("Op", "reference", cpu, ("triton",), reasons) == "reference"
    with pytest.raises(RuntimeError, match="backend='triton' cannot serve cpu tensors: no GPU"):
        backend.resolve("Op", "triton", cpu, ("triton",), reasons)
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.resolve("Op", "cuda", cpu, (), reasons)
    with pytest.raises(ValueError, match="backend: expected one of"):
        backend.check_op_backend("Op", "auto", cpu, reasons)
