"""pytest-benchmark over the same providers as lorakern-bench (kept out of the normal test run):

    pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

from lorakern.bench.providers import Shape, available_providers, make_module, make_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPES = [Shape(4096, 4096, 4096, 16), Shape(1, 4096, 4096, 16)] if DEVICE == "cuda" else [
    Shape(256, 1024, 1024, 16), Shape(1, 1024, 1024, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s.M}-{s.in_features}x{s.out_features}-r{s.r}")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", available_providers(DEVICE))
def test_lora_linear(benchmark, provider, mode, shape):
    module = make_module(provider, shape, DTYPE, DEVICE, 0.0)
    step = make_step(module, mode, shape, DTYPE, DEVICE)
    if DEVICE == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.group = f"{mode} {shape}"
    benchmark(run)
