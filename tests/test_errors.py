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
