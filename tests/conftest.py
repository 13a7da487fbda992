import os

# The Triton interpreter must be chosen before triton is first imported. Without a GPU the kernels
# run interpreted on CPU tensors; with one, natively (set TRITON_INTERPRET yourself to override).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
try:  # imported now, in the mode chosen above: a test that sets TRITON_INTERPRET=0 must not be first
    import triton  # noqa: F401
except ImportError:
    pass

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["scalar", "avx2-vpermps", "avx2-vpshufb", "avx512"])
def isa(request, monkeypatch):
    """Each CPU path of the native kernels in turn ($LORAKERN_CPU_ISA), skipped where this CPU or
    build lacks it."""
    from lorakern.nf4 import native

    C = native.extension()
    if C is None or request.param not in C.available_isas():
        pytest.skip(f"{request.param} not available on this CPU / build")
    monkeypatch.setenv(native.ISA_ENV, request.param)
    return request.param


@pytest.fixture
def device():
    """CUDA when present, else CPU (where the Triton kernels run in the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
