"""PEFT in one line: ``fuse(model)`` runs every PEFT LoRA ``Linear`` through lorakern's fused op.

    model = peft.get_peft_model(base, LoraConfig(...))
    lorakern.integrations.peft.fuse(model)      # same modules, same Parameters, same state_dict
    ...train, model.save_pretrained(...)...    # adapters plain PEFT loads
    lorakern.integrations.peft.unfuse(model)

How: each LoRA layer keeps its modules and parameters; only its ``forward`` is replaced (an
instance attribute, removed by ``unfuse``). So an optimizer built before ``fuse`` still holds the
right Parameters, adapter names, ``set_adapter`` / ``disable_adapter`` and ``save_pretrained`` /
``load_adapter`` behave as in PEFT, and state_dict keys do not change.

The fused forward serves one active vanilla-LoRA adapter on an ``nn.Linear`` or bitsandbytes NF4
``Linear4bit`` base. Anything else is PEFT's own forward, never an approximation: layers whose
configuration the fused op does not cover (DoRA and other variants, ``lora_bias``,
``fan_in_fan_out``, other base layers) are left unfused with one warning at ``fuse``; calls the op
cannot serve at run time (several active adapters, adapters disabled, merged, ``adapter_names``
mixed batches) go to PEFT's forward, with a one-time warning per reason.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..backend import warn_once
from ..layers import _is_bnb_linear4bit
from ..nf4.format import NF4Weight
from ..ops import lora_linear
from ..qlora import qlora_linear

_FUSED = "_lorakern_fused"


def _lora_layers(model: nn.Module):
    from peft.tuners.lora.layer import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def unsupported_reason(layer) -> str | None:
    """Why ``layer`` (a PEFT LoRA layer) cannot be fused at all, or None."""
    base = layer.get_base_layer()
    if not (type(base) is nn.Linear or _is_bnb_linear4bit(base)):
        return f"base layer {type(base).__name__} (only nn.Linear and bitsandbytes NF4 Linear4bit are fused)"
    if _is_bnb_linear4bit(base) and getattr(base.weight, "quant_type", "nf4") != "nf4":
        return "a 4-bit base that is not NF4"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    for adapter in layer.lora_A:
        if adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
            return f"adapter {adapter!r} is a LoRA variant (DoRA, ...)"
        if layer.lora_bias.get(adapter, False):
            return f"adapter {adapter!r} has lora_bias=True"
        if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
            return f"adapter {adapter!r} has a dropout module of type {type(layer.lora_dropout[adapter]).__name__}"
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    reason = _runtime_reason(self, args, kwargs)
    if reason is not None:
        warn_once(f"lorakern.integrations.peft: PEFT's own forward runs for this call ({reason})")
        return type(self).forward(self, x, *args, **kwargs)
    adapter = next(a for a in self.active_adapters if a in self.lora_A)
    base = self.get_base_layer()
    A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    if A.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        # PEFT keeps adapters in fp32 on a 16-bit base; the fused op computes in x's dtype.
        A, B = A.to(x.dtype), B.to(x.dtype)
    if _is_bnb_linear4bit(base):
        bias = base.bias if base.bias is None or base.bias.dtype == x.dtype else base.bias.to(x.dtype)
        return qlora_linear(x, NF4Weight.from_bnb(base), bias, A, B, self.scaling[adapter], p,
                            training=self.training)
    return lora_linear(x, base.weight, base.bias, A, B, self.scaling[adapter], p, training=self.training)


def _runtime_reason(layer, args, kwargs) -> str | None:
    if args or kwargs:
        return "extra forward arguments (adapter_names mixed batches, ...)"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged into the base weight"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters on one layer (the fused op serves exactly one)"
    return None


def fuse(model: nn.Module) -> int:
    """Route every fusable PEFT LoRA linear of ``model`` through lorakern, in place. Returns how
    many layers were fused; warns once, naming the layers left to PEFT and why."""
    fused, skipped = 0, {}
    for name, layer in _lora_layers(model):
        reason = unsupported_reason(layer)
        if reason is not None:
            skipped.setdefault(reason, []).append(name)
            continue
        layer.forward = types.MethodType(_fused_forward, layer)
        setattr(layer, _FUSED, True)
        fused += 1
    for reason, names in skipped.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warn_once(f"lorakern.integrations.peft.fuse: {len(names)} LoRA layer(s) left to PEFT ({reason}): {shown}")
    return fused


def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse`: PEFT's own forward again. Returns how many layers were restored."""
    restored = 0
    for _, layer in _lora_layers(model):
        if getattr(layer, _FUSED, False):
            del layer.forward
            delattr(layer, _FUSED)
            restored += 1
    return restored


def is_fused(layer: nn.Module) -> bool:
    return getattr(layer, _FUSED, False)
