"""FusedLoRALinear and lora_linear against PEFT's own LoRA layer on an nn.Linear."""

import copy

import pytest
import torch
from torch import nn

import lorakern

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.proj = nn.Linear(48, 40, bias=bias)

    def forward(self, x):
        return self.proj(x)


def assert_fp32_rounding(got, ref):
    """Equal up to fp32 rounding: within 8 ulps of the largest element (a fixed absolute tolerance
    is below one ulp for grads of magnitude ~100, where a different summation order already differs)."""
    bound = 8 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    assert got.shape == ref.shape and err <= bound, f"max |diff| {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matches_peft(use_rslora, bias, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from lorakern.backend import interpreting

        if not (interpreting() or torch.cuda.is_available()):
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    net = Net(bias).to(device)
    base = copy.deepcopy(net.proj)
    cfg = peft.LoraConfig(r=8, lora_alpha=24, target_modules=["proj"], lora_dropout=0.0,
                          use_rslora=use_rslora, init_lora_weights=False)
    model = peft.get_peft_model(net, cfg)
    layer = model.base_model.model.proj
    fused = lorakern.FusedLoRALinear.from_linear(base, r=8, lora_alpha=24, use_rslora=use_rslora, backend=backend)
    with torch.no_grad():
        fused.lora_A.copy_(layer.lora_A["default"].weight)
        fused.lora_B.copy_(layer.lora_B["default"].weight)
    assert fused.scaling == pytest.approx(layer.scaling["default"])

    x = torch.randn(3, 5, 48, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft = model(x1)
    y = fused(x2)
    assert_fp32_rounding(y, y_peft)
    g = torch.randn_like(y)
    y_peft.backward(g)
    y.backward(g)
    assert_fp32_rounding(x2.grad, x1.grad)
    assert_fp32_rounding(fused.lora_A.grad, layer.lora_A["default"].weight.grad)
    assert_fp32_rounding(fused.lora_B.grad, layer.lora_B["default"].weight.grad)

    # The functional op on the same tensors gives the same answer.
    y_fn = lorakern.lora_linear(x, base.weight, base.bias, fused.lora_A, fused.lora_B, fused.scaling, backend=backend)
    assert_fp32_rounding(y_fn, y_peft)


def test_dropout_semantics_match_peft_in_expectation():
    """PEFT draws its mask from torch's dropout, ours from the hash: the same law, so the average
    output over many draws converges to the same (no-dropout) value."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    fused = lorakern.FusedLoRALinear.from_linear(lin, r=4, lora_dropout=0.2, backend="reference")
    with torch.no_grad():
        fused.lora_B.normal_()
    x = torch.randn(8, 32)
    draws = torch.stack([fused(x) for _ in range(3000)]).double()
    mean, sem = draws.mean(0), draws.std(0) / 3000**0.5
    fused.eval()
    z = ((mean - fused(x).double()) / sem).abs().max().item()
    assert z < 5.0, f"largest deviation of the mean is {z:.1f} standard errors"
