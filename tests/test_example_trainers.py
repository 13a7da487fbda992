"""The Trainer and SFTTrainer examples, short: fused and PEFT runs log the same losses and learn."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import finetune_tiny_llama beside them
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_same_and_learning(a, b, drop):
    # AdamW, as the examples train: rounding differences grow through Adam's normalisation (see
    # tests/test_trainers.py), so the comparison stays short and at 1e-4.
    assert len(a) == len(b) > 1
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-4 * abs(x), f"log {step}: PEFT {x:.6f} vs fused {y:.6f}"
    assert b[-1] < b[0] - drop, f"the loss should fall: {b[0]:.3f} -> {b[-1]:.3f}"


def test_trainer_example(tmp_path, monkeypatch):
    ex = load("train_with_trainer", monkeypatch)
    runs = [ex.train(mode, steps=16, batch=8, seq=48, out=str(tmp_path)) for mode in ("peft", "fused")]
    assert_same_and_learning(runs[0]["losses"], runs[1]["losses"], drop=0.2)
    assert (tmp_path / "fused" / "checkpoint-16" / "adapter_model.safetensors").exists()


def test_sft_example(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    ex = load("train_with_sft", monkeypatch)
    runs = [ex.train(mode, steps=8, batch=8, out=str(tmp_path)) for mode in ("peft", "fused")]
    assert_same_and_learning(runs[0]["losses"], runs[1]["losses"], drop=0.1)
