"""A pytest plugin that runs PEFT's own test suite with every LoRA model passed through
``lorakern.integrations.peft.fuse`` right after adapter injection.

    LORAKERN_FUSE=1 python -m pytest -p fuse_plugin tests/test_custom_models.py -k "lora or Lora"

(with this folder on PYTHONPATH, from an unpacked PEFT sdist). ``LORAKERN_FUSE=0`` runs the same
tests unfused: the baseline. ``compare.py`` lists the tests that pass unfused and fail fused.
"""

import os
import warnings

import pytest
from peft.tuners import tuners_utils

import lorakern.integrations.peft as integration

_inject = tuners_utils.BaseTuner.inject_adapter
_serve = integration.fused_lora_forward
_counts = {"fuse calls": 0, "layers fused": 0, "calls served by the fused op": 0}


def _inject_then_fuse(self, model, *args, **kwargs):
    out = _inject(self, model, *args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuse names the layers it leaves to PEFT; not a test failure
        _counts["layers fused"] += integration.fuse(model)
    _counts["fuse calls"] += 1
    return out


def _counted_serve(layer, x):
    _counts["calls served by the fused op"] += 1
    return _serve(layer, x)


if os.environ.get("LORAKERN_FUSE", "1") == "1":
    tuners_utils.BaseTuner.inject_adapter = _inject_then_fuse
    integration.fused_lora_forward = _counted_serve


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("lorakern: " + ", ".join(f"{k} {v}" for k, v in _counts.items()))


def pytest_report_header(config):
    return f"lorakern fuse after inject_adapter: {os.environ.get('LORAKERN_FUSE', '1') == '1'}"


@pytest.fixture(autouse=True)
def _no_lorakern_warning_errors():
    # PEFT's tests may turn warnings into errors; lorakern's one-time fallback notes are not failures.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lorakern")
        yield
