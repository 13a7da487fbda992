"""Many adapters over one base: N PEFT folders loaded into one fused model (outputs as PEFT's mixed
batch), several adapters trained in one mixed batch (grads as PEFT's one adapter at a time, saved
as plain PEFT folders), and the routing's errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import PeftBlock, assert_close_like_torch
from torch import nn

peft = pytest.importorskip("peft")

from lorakern.integrations import adapters as multi  # noqa: E402
from lorakern.integrations import peft as integration  # noqa: E402

TARGETS = ["q", "up", "down"]


CONFIGS = {  # different ranks, alphas, rsLoRA, and target modules
    "support": dict(r=8, lora_alpha=16, target_modules=TARGETS),
    "legal": dict(r=4, lora_alpha=12, target_modules=TARGETS, use_rslora=True),
    "code": dict(r=16, lora_alpha=8, target_modules=["q", "up"]),
}


def _base():
    torch.manual_seed(0)
    return PeftBlock()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved PEFT folder per adapter of CONFIGS, with random (non-zero) B."""
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(_base(), peft.LoraConfig(init_lora_weights=False, **cfg))
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_load_adapters_serves_mixed_batches_as_peft(folders, monkeypatch):
    """load_adapters + mixed_batch by name and by index: PEFT's adapter_names output, every routed
    LoRA layer served by one multi_lora_linear call."""
    fused = multi.load_adapters(_base(), folders).eval()
    ref = multi.load_adapters(_base(), folders, fuse=False).eval()
    assert multi.adapter_order(fused) == list(CONFIGS)
    names = ["support", "legal", "__base__", "code", "legal", "support"]
    x = torch.randn(6, 5, 48)
    calls = []
    real = integration.multi_lora_linear
    monkeypatch.setattr(integration, "multi_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        want = ref(x, adapter_names=names)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "lorakern.integrations.peft")  # no layer falls back to PEFT
            with multi.mixed_batch(fused, names):
                got = fused(x)
            with multi.mixed_batch(fused, torch.tensor([0, 1, -1, 2, 1, 0])):
                by_index = fused(x)
    assert len(calls) == 6  # three layers, two forwards
    # Inference on the CPU adds the adapter terms natively, in another summation order than PEFT's
    # torch ops: within 2x PEFT's own fp32 error against PEFT in float64.
    with torch.no_grad():
        want64 = copy.deepcopy(ref).double()(x.double(), adapter_names=names)
    assert_close_like_torch("y", got, want64, want, torch.float32)
    torch.testing.assert_close(by_index, got, rtol=0, atol=0)
    with torch.no_grad():  # outside the context, the active (first) adapter again
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-6, atol=1e-6)


def test_training_several_adapters_in_one_batch_and_saving_each(folders, tmp_path):
    """A mixed batch in training mode: each adapter's grads equal PEFT's when that adapter is
    trained alone on its own samples (to fp32 rounding: the sums run in another order); after a
    step, save_pretrained writes one PEFT folder per adapter, and loading them gives the trained
    weights."""
    model = multi.load_adapters(_base(), folders, is_trainable=True).train()
    ref = multi.load_adapters(_base(), folders, is_trainable=True, fuse=False).train()
    for m in (model, ref):
        for name, p in m.named_parameters():
            p.requires_grad_("lora_" in name)
    names = ["legal", "support", "code", "support", "__base__", "legal", "code"]
    x = torch.randn(7, 3, 48)
    g = torch.randn(7, 3, 48)
    with multi.mixed_batch(model, names):
        (model(x) * g).sum().backward()
    for adapter in CONFIGS:  # PEFT: one adapter at a time, on its own samples
        rows = [i for i, n in enumerate(names) if n == adapter]
        ref.base_model.set_adapter(adapter)
        for name, p in ref.named_parameters():
            p.requires_grad_("lora_" in name)
        (ref(x[rows]) * g[rows]).sum().backward()
    grads = dict(model.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        if "lora_" in name:
            err = float((grads[name].grad - p.grad).abs().max() / p.grad.abs().max())
            assert err < 1e-5, (name, err)
            checked += 1
    assert checked == 2 * (3 + 3 + 2)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.save_pretrained(tmp_path)
    saved = {name: str(tmp_path / name) for name in CONFIGS}  # PEFT: a folder per adapter not named "default"
    reloaded = dict(multi.load_adapters(_base(), saved).named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(reloaded[name], p, rtol=0, atol=0, msg=name)


def test_training_with_dropout_runs_fused(folders):
    """Per-adapter dropout in a training mixed batch runs in the fused op (no fallback to PEFT)."""
    model = multi.load_adapters(_base(), folders, is_trainable=True).train()
    for layer in model.modules():
        if hasattr(layer, "lora_dropout") and "legal" in layer.lora_dropout:
            layer.lora_dropout["legal"] = nn.Dropout(0.3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "lorakern.integrations.peft")
        with multi.mixed_batch(model, ["legal", "support"]):
            y = model(torch.randn(2, 4, 48))
    y.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and "legal" in n)


def test_routing_errors(folders):
    model = multi.load_adapters(_base(), folders)
    for routes, match in [
        (["support", "nope"], r"routes\[1\]: no adapter named 'nope'"),
        ([0, 3], r"routes\[1\]: expected an adapter name or an index in \[-1, 2\]"),
        ([0, True], r"routes\[1\]"),
        (torch.tensor([0.0, 1.0]), "routes: expected a 1-D integer tensor"),
        (torch.zeros(2, 2, dtype=torch.long), "routes: expected a 1-D integer tensor"),
        ("support", "routes: expected one adapter name or index per sample"),
        ([], "routes: expected one adapter name or index per sample"),
    ]:
        with pytest.raises(ValueError, match=match):
            with multi.mixed_batch(model, routes):
                pass
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's own check, per layer
        with multi.mixed_batch(model, [0, 1]):
            model(torch.randn(3, 48))
    model.train()
    model.gradient_checkpointing = True
    with pytest.raises(ValueError, match="gradient checkpointing"):
        with multi.mixed_batch(model, [0]):
            pass
    for bad, exc in [({}, ValueError), ("path", TypeError), ({"__base__": folders["support"]}, ValueError)]:
        with pytest.raises(exc, match="adapters:"):
            multi.load_adapters(_base(), bad)
    copy.deepcopy(model)  # the routed model stays a plain module
