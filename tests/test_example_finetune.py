"""The fine-tuning example, short: the fused and PEFT runs (LoRA and DoRA) agree step by step (dropout 0) and
learn."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "finetune_tiny_llama.py"


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_tiny_llama", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("use_dora", [False, True])
def test_fused_and_peft_losses_agree_step_by_step(use_dora):
    ft = load_example()
    peft_run = ft.train("peft", steps=20, batch=8, seq=48, use_dora=use_dora)
    fused_run = ft.train("fused", steps=20, batch=8, seq=48, use_dora=use_dora)
    a, b = peft_run["losses"], fused_run["losses"]
    # Same init, same batches, same math: only float rounding differs (it compounds through Adam after
    # ~30 steps, so the comparison stays short).
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-4 * abs(x), f"step {step}: PEFT {x:.6f} vs fused {y:.6f}"
    assert b[-1] < b[0] - 0.2, f"the loss should fall: {b[0]:.3f} -> {b[-1]:.3f}"
