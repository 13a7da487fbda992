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
_serve = getattr(integration, "fused_lora_forward", None)
_counts = {"fuse calls": 0, "layers fused": 0, "calls served by the fused op": 0}


def _inject_then_fuse(self, model, *args, **kwargs):
    out = _inject(self, model, *args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuse names the layers it leaves to PEFT; not a test failure
        _counts["layers fused"] += integration.fuse(model)
    _counts["fuse calls"] += 1
    return out


_reason = getattr(integration, "runtime_reason", None)
_fallbacks: dict = {}


def _counted_reason(layer, x, args, kwargs):
    reason = _reason(layer, x, args, kwargs)
    if reason is not None:
        key = reason.split(" (")[0] if "adapter '" not in reason else reason.split("'")[0] + "...'" + \
            reason.split("'", 2)[-1].split(" (")[0]
        _fallbacks[key] = _fallbacks.get(key, 0) + 1
    return reason


def _counted_serve(layer, x):
    _counts["calls served by the fused op"] += 1
    return _serve(layer, x)


if os.environ.get("LORAKERN_FUSE", "1") == "1":
    tuners_utils.BaseTuner.inject_adapter = _inject_then_fuse
    if hasattr(integration, "fused_lora_forward"):  # counted where this lorakern has them
        integration.fused_lora_forward = _counted_serve
        integration.runtime_reason = _counted_reason


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("lorakern: " + ", ".join(f"{k} {v}" for k, v in _counts.items()))
    for reason, n in sorted(_fallbacks.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"lorakern: {n} calls to PEFT's forward: {reason}")


def pytest_report_header(config):
    return f"lorakern fuse after inject_adapter: {os.environ.get('LORAKERN_FUSE', '1') == '1'}"


@pytest.fixture(autouse=True)
def _no_lorakern_warning_errors():
    # PEFT's tests may turn warnings into errors; lorakern's one-time fallback notes are not failures.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="lorakern")
        yield
