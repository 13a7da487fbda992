"""FusedLoRALinear: construction, init, merge, autocast, checkpointing, train/eval."""

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakern
from lorakern import FusedLoRALinear
from tests.helpers import assert_same_as_op


def _randomize(layer):
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_fresh_layer_equals_base():
    layer = FusedLoRALinear(20, 12, r=4, lora_alpha=16, backend="reference")
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.scaling == 4.0


def test_rslora_scaling_and_gaussian_init():
    layer = FusedLoRALinear(64, 8, r=16, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian")
    assert layer.scaling == pytest.approx(8 / math.sqrt(16))
    assert abs(layer.lora_A.std().item() - 1 / 16) < 0.01
    assert (layer.lora_B == 0).all()
    layer = FusedLoRALinear(64, 8, r=16, init_lora_weights=False)
    assert (layer.lora_B != 0).any()


def test_kaiming_init_bound():
    layer = FusedLoRALinear(400, 8, r=32)
    bound = 1 / math.sqrt(400)  # kaiming_uniform with a=sqrt(5) on fan_in=400
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound


def test_from_linear_shares_parameters():
    lin = nn.Linear(10, 6)
    layer = FusedLoRALinear.from_linear(lin, r=2, lora_alpha=4, lora_dropout=0.1)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad
    assert layer.lora_dropout == 0.1 and layer.r == 2
    with pytest.raises(TypeError, match="linear"):
        FusedLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_merge_unmerge_to_linear():
    layer = _randomize(FusedLoRALinear(24, 10, r=3, lora_alpha=6, dtype=torch.float64, backend="reference"))
    x = torch.randn(5, 24, dtype=torch.float64)
    want = layer(x)
    w0 = layer.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer.to_linear()(x), want)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(layer.to_linear()(x), want)
    assert "r=3" in repr(layer) and "scaling=2" in repr(layer)


def test_train_eval_dropout():
    layer = _randomize(FusedLoRALinear(16, 8, r=4, lora_dropout=0.5, backend="reference"))
    x = torch.randn(6, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_input_without_grad_trains_adapter():
    layer = _randomize(FusedLoRALinear(16, 8, r=4, backend="reference"))
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and layer.weight.grad is None


def test_autocast_cpu_bf16_like_nn_linear():
    layer = _randomize(FusedLoRALinear(32, 16, r=4, backend="reference"))
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == base.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    want = layer.weight.bfloat16()
    ref = lorakern.lora_linear_reference(
        x.bfloat16(), want, layer.bias.bfloat16(), layer.lora_A.bfloat16(), layer.lora_B.bfloat16(), layer.scaling
    )
    torch.testing.assert_close(y, ref)


def test_checkpoint_recompute_gives_identical_dropout():
    torch.manual_seed(1)
    layer = _randomize(FusedLoRALinear(16, 8, r=4, lora_dropout=0.3, backend="reference"))
    x = torch.randn(10, 16, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    torch.manual_seed(7)
    y2 = checkpoint(layer, x, use_reentrant=False)
    torch.testing.assert_close(y2, y)
    y2.sum().backward()
    for g, t in zip(grads, (x, layer.lora_A, layer.lora_B)):
        torch.testing.assert_close(t.grad, g)


def test_state_dict_round_trip():
    a = _randomize(FusedLoRALinear(12, 6, r=2))
    b = FusedLoRALinear(12, 6, r=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 12)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_paths_equal_the_op(backend, p):
    """Outside torch.compile, lora_linear runs the op's bodies without the dispatcher (an
    autograd.Function with the op's saved tensors and backward; under no_grad, the bare forward):
    outputs and every grad are bitwise those of torch.ops.lorakern.lora_fwd with its autograd."""
    if backend == "triton":
        from lorakern.backend import interpreting

        if not interpreting():
            pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors)")
    x = torch.randn(2, 9, 24)
    w, b = torch.randn(20, 24), torch.randn(20)
    a, bb = torch.randn(4, 24), torch.randn(20, 4)

    def run(via_op, leaves, seed):
        if not via_op:
            return lorakern.lora_linear(*leaves[:1], w, *leaves[1:], 1.5, p, backend=backend)
        y, *_ = torch.ops.lorakern.lora_fwd(leaves[0].reshape(-1, 24), w, *leaves[1:], 1.5, p, seed, None, backend)
        return y.reshape(2, 9, 20)

    y_op = assert_same_as_op(run, (x, b, a, bb), torch.randn(2, 9, 20), p, seed=7)
    with torch.no_grad():
        torch.manual_seed(7)
        y_inf = lorakern.lora_linear(x, w, b, a, bb, 1.5, p, backend=backend)
    assert torch.equal(y_inf, y_op)


def test_merged_state_dict_round_trips():
    """merge, save, load into a fresh (unmerged) layer: the same output, never the adapter twice;
    and an unmerged state into a merged layer makes it unmerged."""
    a = FusedLoRALinear(8, 6, r=2, init_lora_weights=False)
    x = torch.randn(3, 8)
    want = a(x).detach()
    unmerged_state = {k: v.clone() for k, v in a.state_dict().items()}
    a.merge()
    state = a.state_dict()
    assert set(state) == {"weight", "bias", "lora_A", "lora_B", "merged"}
    fresh = FusedLoRALinear(8, 6, r=2)
    fresh.load_state_dict(state)
    assert fresh.merged
    torch.testing.assert_close(fresh(x), want)
    fresh.unmerge()
    torch.testing.assert_close(fresh(x), want)
    torch.testing.assert_close(fresh.weight, unmerged_state["weight"])
    a.load_state_dict(unmerged_state)  # a is merged; the state is not
    assert not a.merged
    torch.testing.assert_close(a(x), want)
    # Adapter weights alone (strict=False) leave the flag as it is.
    a.merge()
    a.load_state_dict({"lora_A": unmerged_state["lora_A"]}, strict=False)
    assert a.merged
    with pytest.raises(RuntimeError, match="merged: expected a one-element bool"):
        fresh.load_state_dict({**state, "merged": torch.ones(2)})


def test_meta_device_like_nn_linear():
    """Model init on meta (init_empty_weights, FSDP2): forward gives shapes, as nn.Linear does."""
    for kw in ({}, {"base_quant": "nf4"}):
        layer = FusedLoRALinear(64, 4, r=2, lora_dropout=0.1, **kw).to("meta")
        x = torch.randn(2, 3, 64, device="meta", requires_grad=True)
        y = layer(x)
        assert y.shape == (2, 3, 4) and y.device.type == "meta"
        y.sum().backward()
        assert layer.lora_A.grad.shape == (2, 64) and layer.lora_A.grad.device.type == "meta"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_in_features_like_f_linear(backend):
    """in_features = 0: y is the bias, as F.linear gives; grads of the right (empty) shapes."""
    pytest.importorskip("triton") if backend == "triton" else None
    x = torch.randn(5, 0, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    A, B = torch.randn(2, 0, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    y = lorakern.lora_linear(x, torch.randn(3, 0), bias, A, B, 1.0, backend=backend)
    torch.testing.assert_close(y, nn.functional.linear(x, torch.randn(3, 0), bias))
    y.sum().backward()
    assert x.grad.shape == (5, 0) and A.grad.shape == (2, 0)
    torch.testing.assert_close(bias.grad, torch.full((3,), 5.0))
    torch.testing.assert_close(B.grad, torch.zeros(3, 2))
    y3 = lorakern.lora_linear(torch.randn(2, 4, 0), torch.randn(3, 0), bias, A, B, 1.0, backend=backend)
    assert y3.shape == (2, 4, 3)
