"""A GPTQ layer's 4-bit base as an :class:`lorakern.INT4Weight`, for ``fuse`` of PEFT's QA-LoRA
adapters (``LoraConfig(use_qalora=True)``) on GPTQ layers.

A GPTQ ``QuantLinear`` (gptqmodel's ``BaseQuantLinear``) holds ``qweight``, ``qzeros``, ``scales``
and ``g_idx``; which zero-point convention its ``qzeros`` follow (``"gptq"``: zero - 1, as v1
checkpoints store them; ``"gptq_v2"``: the zero, as gptqmodel converts them to on load) is not
an attribute of the layer. So the import is checked against the layer itself: both conventions
are imported exactly and each is compared, on four random rows, with the layer's own forward; the
one that matches to the layer's rounding (relative error below 1e-2: a wrong zero shifts every
weight of a group by a whole scale, ~30% of the output) is kept, else the layer is left to PEFT.
One probe per layer and weight version: the result is kept on the layer, keyed by the tensors'
addresses and version counters.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..int4.format import FORMATS, INT4Weight
from ..stamp import stamp

_CACHE = "_lorakern_int4"
MATCH = 1e-2  # the layer's fp16 kernel against the exact import: ~1e-3 on random rows


def is_gptq_linear(module) -> bool:
    """gptqmodel's ``BaseQuantLinear`` (by name: gptqmodel may not import here)."""
    return _is_gptq_class(type(module))


@functools.lru_cache(maxsize=256)
def _is_gptq_class(cls: type) -> bool:
    # Per class, once: a fused layer asks about its base ~4 times a call, each a walk over the
    # MRO's names.
    return any(c.__name__ == "BaseQuantLinear" and c.__module__.startswith("gptqmodel") for c in cls.__mro__)


def int4_of(base: nn.Module) -> tuple[INT4Weight | None, str | None]:
    """``(weight, None)``: the INT4 weight that computes what the GPTQ layer ``base`` computes, or
    ``(None, reason)``. Kept while the layer's tensors are the same and unchanged (probed on every
    call for tensors without a version counter, made under inference_mode)."""
    tensors = (base.qweight, base.qzeros, base.scales)
    key = stamp(*tensors)
    cached = base.__dict__.get(_CACHE)
    if key is not None and cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1], tensors)):
        return cached[2], cached[3]
    weight, reason = _probe(base)
    if key is not None:
        base.__dict__[_CACHE] = (key, tensors, weight, reason)
    return weight, reason


def _probe(base) -> tuple[INT4Weight | None, str | None]:
    bits, group_size = getattr(base, "bits", None), getattr(base, "group_size", None)
    if bits != 4:
        return None, f"a {bits}-bit GPTQ layer (only 4-bit is read)"
    candidates = []
    for fmt in FORMATS:
        try:
            candidates.append(INT4Weight.from_gptq(base.qweight, base.qzeros, base.scales, getattr(base, "g_idx", None),
                                                   group_size=group_size, checkpoint_format=fmt))
        except (TypeError, ValueError, NotImplementedError) as e:
            return None, f"its GPTQ tensors: {e}"
    x = torch.randn(4, candidates[0].shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(base.scales.device, base.scales.dtype)
    with torch.no_grad():
        try:
            y = base(x).float()
        except Exception as e:  # a layer on the meta device, a kernel that needs another input: PEFT's path
            return None, f"its forward failed on a probe input ({type(e).__name__}: {e})"
        if getattr(base, "bias", None) is not None:
            y = y - base.bias.float()
        errors = [float((y - x.float() @ w.dequantize(torch.float32).t()).norm() / y.norm().clamp(min=1e-30))
                  for w in candidates]
    best = min(range(len(errors)), key=errors.__getitem__)
    if errors[best] > MATCH:
        return None, (f"its own forward matches neither zero-point convention (relative error "
                      f"{', '.join(f'{f} {e:.2g}' for f, e in zip(FORMATS, errors))})")
    return candidates[best], None
