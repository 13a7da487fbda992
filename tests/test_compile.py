"""torch.compile(fullgraph=True) traces a model of FusedLoRALinear layers (no graph breaks)."""

import pytest
import torch
from torch import nn

import lorakern


@pytest.mark.slow
def test_compile_fullgraph_two_layers_matches_eager():
    # float64: inductor fuses the GELU and rounds differently from eager in fp32 (~1e-5); in
    # float64 any real difference (a wrong op, a missing grad) still shows, rounding does not.
    torch.manual_seed(0)
    model = nn.Sequential(
        lorakern.FusedLoRALinear(32, 48, r=4, lora_alpha=8, dtype=torch.float64),
        nn.GELU(),
        lorakern.FusedLoRALinear(48, 16, r=8, lora_alpha=8, dtype=torch.float64),
    )
    for m in model:
        if isinstance(m, lorakern.FusedLoRALinear):
            with torch.no_grad():
                m.lora_B.normal_()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    y_eager = model(x)
    y_eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g)


def test_compile_traces_the_op():
    """Under torch.compile the layer is the lorakern::lora_fwd op in the graph (eager runs its
    bodies through an autograd.Function instead, which dynamo would otherwise trace into)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    layer = lorakern.FusedLoRALinear(16, 8, r=4, lora_alpha=8, backend="reference")
    x = torch.randn(3, 16, requires_grad=True)
    y = torch.compile(layer, backend=record, fullgraph=True)(x)
    torch.testing.assert_close(y, layer(x))
    assert len(graphs) == 1 and "lorakern.lora_fwd" in graphs[0]


def test_compile_traces_nf4_matmul_as_the_op():
    """Eager nf4_matmul runs the op's body directly; under torch.compile it is the
    lorakern::nf4_matmul op in the graph (no graph break), with the same output; with x needing a
    grad it is the op too, so backward says it has no formula, on every backend."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.manual_seed(0)
    w = lorakern.NF4Weight.quantize(torch.randn(24, 64), 64)
    x = torch.randn(2, 3, 64)
    y = torch.compile(lambda x: lorakern.nf4_matmul(x, w), backend=record, fullgraph=True)(x)
    assert torch.equal(y, lorakern.nf4_matmul(x, w)) and y.shape == (2, 3, 24)
    assert len(graphs) == 1 and "lorakern.nf4_matmul" in graphs[0]
    for backend in ("native", "reference"):  # not differentiable on any backend, said at backward
        y = lorakern.nf4_matmul(x.clone().requires_grad_(), w, backend=backend)
        with pytest.raises(RuntimeError, match="no autograd formula was registered"):
            y.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("base_quant", [None, "nf4"])
def test_compile_fullgraph_on_cuda(base_quant):
    torch.manual_seed(0)
    kw = dict(dtype=torch.bfloat16, device="cuda", init_lora_weights=False, base_quant=base_quant)
    model = nn.Sequential(lorakern.FusedLoRALinear(256, 384, r=16, lora_alpha=32, **kw), nn.ReLU(),
                          lorakern.FusedLoRALinear(384, 128, r=8, lora_alpha=8, **kw))
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    y_eager = model(x)
    y_eager.float().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    y = torch.compile(model, fullgraph=True)(x)
    y.float().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g)
