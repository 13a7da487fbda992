"""pytest-benchmark over the 4-bit suite's providers (QLoRA layer eval forward vs dense and
bitsandbytes), kept out of the normal test run:

    pytest benchmarks/ --benchmark-only
"""

import pytest
import torch

from lorakern.bench import nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPUTE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
WEIGHTS = [(4096, 4096), (4096, 14336)]


@pytest.mark.parametrize("M", [1, 16, 256])
@pytest.mark.parametrize("weight", WEIGHTS, ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("provider", nf4.available())
def test_nf4_linear(benchmark, provider, weight, M):
    k, n = weight
    torch.manual_seed(0)
    module = nf4.make_linear(provider, k, n, COMPUTE, DEVICE)
    x = torch.randn(M, k, device=DEVICE, dtype=nf4.input_dtype(provider, COMPUTE))

    def run():
        with torch.no_grad():
            module(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"nf4_linear M={M} {k}->{n}"
    benchmark(run)
