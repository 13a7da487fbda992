"""``fuse`` on PEFT's QA-LoRA adapters (``use_qalora=True``) over GPTQ layers.

PEFT dispatches its ``GPTQLoraLinear`` only onto gptqmodel's ``BaseQuantLinear``, and gptqmodel
does not install on these CPU machines (no wheel; auto-gptq does not import beside transformers 5).
So the base here is a stand-in: a ``BaseQuantLinear`` in a module registered as ``gptqmodel``,
whose forward computes ``x W^T + bias`` from ``qweight``, ``qzeros``, ``scales`` by the documented
GPTQ layout (the layout :meth:`INT4Weight.from_gptq` was checked against AutoGPTQ's packer for).
Everything else is PEFT's own code: its dispatch, ``GPTQLoraLinear`` and its QA-LoRA variant's
forward, against which the fused layer's outputs and grads are compared."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
from torch import nn

from lorakern.int4.format import INT4Weight, unpack_codes
from lorakern.integrations import gptq as lk_gptq
from lorakern.integrations.peft import fuse, is_fused

peft = pytest.importorskip("peft")
pytest.importorskip("peft.tuners.lora.gptq")


@pytest.fixture
def quant_linear(monkeypatch):
    """The stand-in GPTQ layer class, with gptqmodel's import path and PEFT's availability check."""
    qlinear = types.ModuleType("gptqmodel.nn_modules.qlinear")

    class BaseQuantLinear(nn.Module):
        pass

    BaseQuantLinear.__module__ = qlinear.__name__
    qlinear.BaseQuantLinear = BaseQuantLinear
    package, nn_modules = types.ModuleType("gptqmodel"), types.ModuleType("gptqmodel.nn_modules")
    package.nn_modules, nn_modules.qlinear = nn_modules, qlinear
    for name, module in (("gptqmodel", package), ("gptqmodel.nn_modules", nn_modules),
                         ("gptqmodel.nn_modules.qlinear", qlinear)):
        monkeypatch.setitem(sys.modules, name, module)
    import peft.tuners.lora.gptq  # noqa: F401  (loaded, so that the loop below patches its name)

    for name, module in list(sys.modules.items()):  # every PEFT module that imported the check by name
        if name.startswith("peft") and hasattr(module, "is_gptqmodel_available"):
            monkeypatch.setattr(module, "is_gptqmodel_available", lambda: True)

    class TorchQuantLinear(BaseQuantLinear):
        """4-bit GPTQ, ``desc_act=False``: W[o, i] = scales[g, o] * (q[i, o] - z[g, o]), g = i // G,
        q packed 8 a word along ``in`` (qweight [in/8, out]), z 8 a word along ``out`` (qzeros
        [in/G, out/8]), stored as z - 1 in the v1 format (``fmt="gptq"``), as z in v2."""

        def __init__(self, w: INT4Weight, bias, fmt: str):
            super().__init__()
            tensors, _ = w.to_gptq(fmt)
            for name, t in tensors.items():
                self.register_buffer(name, t)
            self.bias = None if bias is None else nn.Parameter(bias.half(), requires_grad=False)
            self.bits, self.group_size, self.fmt = 4, w.group_size, fmt
            self.out_features, self.in_features = w.shape

        def dense(self, dtype):
            shifts = torch.arange(0, 32, 4, dtype=torch.int32)
            q = ((self.qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(self.in_features, -1)
            z = ((self.qzeros[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(-1, self.out_features)
            z = z.float() + (1.0 if self.fmt == "gptq" else 0.0)
            g = torch.arange(self.in_features) // self.group_size
            return (self.scales.float()[g] * (q.float() - z[g])).t().to(dtype)

        def forward(self, x):
            y = x @ self.dense(x.dtype).t()
            return y if self.bias is None else y + self.bias.to(x.dtype)

    return TorchQuantLinear


def _model(quant_linear, fmt="gptq_v2", G=32, qalora_group_size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Sequential()
    for i, (n_in, n_out) in enumerate(((128, 64), (64, 96))):
        w = INT4Weight.quantize(torch.randn(n_out, n_in, generator=g) * n_in**-0.5, G)
        zeros = torch.clamp(torch.round(w.zeros), 1, 15)  # GPTQ's integer zeros: the stand-in is then exact
        w = INT4Weight(w.codes, w.scales.half().float(), zeros, G, (n_out, n_in))
        base.add_module(str(i), quant_linear(w, torch.randn(n_out, generator=g), fmt))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], lora_dropout=0.0, use_qalora=True,
                             qalora_group_size=qalora_group_size or G, init_lora_weights=False)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_fused_qalora_on_gptq_layers_matches_peft(quant_linear, fmt):
    """Outputs and grads of the fused model equal PEFT's unfused ones (fp32), with either zero-point
    convention in the layer (the import is checked against the layer's own forward); the INT4 weight
    fuse reads is the layer's exactly."""
    model = _model(quant_linear, fmt)
    x = torch.randn(3, 5, 128)
    y_peft = model(x)
    y_peft.square().sum().backward()
    grads_peft = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    assert fuse(model) == 2
    layer = model.base_model.model[0]
    assert is_fused(layer) and type(layer).__name__ == "GPTQLoraLinear"
    w, reason = lk_gptq.int4_of(layer.base_layer)
    assert reason is None and torch.equal(w.dequantize(torch.float32), layer.base_layer.dense(torch.float32))
    calls = []
    from lorakern.integrations import peft as lk_peft

    real = lk_peft.qalora_linear
    lk_peft.qalora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        y = model(x)
    finally:
        lk_peft.qalora_linear = real
    assert len(calls) == 2
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_peft[n], rtol=1e-4, atol=1e-5, msg=n)


def test_gptq_layers_fuse_only_what_the_op_computes(quant_linear):
    """A QA-LoRA adapter pooling other groups than the base's, or a layer whose forward matches
    neither GPTQ convention, stays PEFT's (a warning names why), and its output is PEFT's."""
    model = _model(quant_linear, qalora_group_size=64)
    with pytest.warns(UserWarning, match="pools groups of 64, the GPTQ base quantizes groups of 32"):
        assert fuse(model) == 0
    model = _model(quant_linear)
    odd = model.base_model.model[1].base_layer
    odd.fmt = "other"  # zeros read with neither offset: its forward is no GPTQ convention
    odd.dense = types.MethodType(lambda self, dtype: type(self).dense(self, dtype) * 1.5, odd)
    x = torch.randn(2, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_peft = model(x)
    with pytest.warns(UserWarning, match="matches neither zero-point convention"):
        assert fuse(model) == 1
    torch.testing.assert_close(model(x), y_peft, rtol=1e-5, atol=1e-5)


def test_int4_of_reads_the_layer_again_after_an_in_place_change(quant_linear):
    """The import is kept per layer until its GPTQ tensors change (address or version counter)."""
    model = _model(quant_linear)
    base = model.base_model.model[0].base_layer
    first, _ = lk_gptq.int4_of(base)
    assert lk_gptq.int4_of(base)[0] is first
    with torch.no_grad():
        base.scales.mul_(2)
    second, reason = lk_gptq.int4_of(base)
    assert reason is None and second is not first
    torch.testing.assert_close(second.scales, first.scales * 2)
    assert torch.equal(unpack_codes(second.codes), unpack_codes(first.codes))


def test_int4_of_a_layer_made_under_inference_mode(quant_linear):
    """A GPTQ layer whose tensors were made under torch.inference_mode() (no version counter) is
    probed on every call instead of cached, and an in-place change there is seen."""
    with torch.inference_mode():
        model = _model(quant_linear)
        base = model.base_model.model[0].base_layer
        first, reason = lk_gptq.int4_of(base)
        assert reason is None and torch.equal(first.dequantize(torch.float32), base.dense(torch.float32))
        base.scales.mul_(2)
        second, reason = lk_gptq.int4_of(base)
        assert reason is None and torch.equal(second.dequantize(torch.float32), base.dense(torch.float32))


def test_a_gptq_layer_whose_forward_fails_on_the_probe_stays_peft_s(quant_linear):
    model = _model(quant_linear)
    base = model.base_model.model[0].base_layer

    def broken(self, x):
        raise RuntimeError("no kernel for this device")

    base.forward = types.MethodType(broken, base)
    weight, reason = lk_gptq.int4_of(base)
    assert weight is None and "forward failed on a probe input (RuntimeError: no kernel" in reason
