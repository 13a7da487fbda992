"""PEFT in one line: ``fuse(model)`` runs every PEFT LoRA ``Linear`` through lorakern's fused op.

    model = peft.get_peft_model(base, LoraConfig(...))
    lorakern.integrations.peft.fuse(model)      # same modules, same Parameters, same state_dict
    ...train, model.save_pretrained(...)...    # adapters plain PEFT loads
    lorakern.integrations.peft.unfuse(model)

How: each LoRA layer keeps its modules and parameters; only its ``forward`` is replaced (an
instance attribute holding a :class:`FusedForward`, removed by ``unfuse``). So an optimizer built
before ``fuse`` still holds the right Parameters, adapter names, ``set_adapter`` /
``disable_adapter`` and ``save_pretrained`` / ``load_adapter`` behave as in PEFT, state_dict keys
do not change, and the model pickles, deep-copies and ``torch.save``-s whole.

Fused: exactly PEFT's LoRA ``Linear`` on an ``nn.Linear`` and its bitsandbytes ``Linear4bit`` (NF4)
layer, whose math the op implements, and PEFT's ``GPTQLoraLinear`` with QA-LoRA adapters pooled over
the base's own groups (:func:`lorakern.qalora_linear` on the layer's INT4 weight, read by
:mod:`.gptq`); not their subclasses (AdaLoRA's ``SVDLinear`` is a LoRA
layer with other math), not a layer whose base is another adapter layer (mixed models), not a
layer whose ``forward`` another library has replaced (X-LoRA). Every call is checked again, since
adapters can be added and switched after ``fuse``: the op serves one active LoRA or DoRA adapter
(``use_dora=True``; no other variant, no ``lora_bias``, dropout p < 1, a frozen base weight, no
hooks on the modules it would bypass), several active plain adapters without dropout in training
(summed: one adapter of their total rank), and PEFT's ``adapter_names`` mixed batches (through
:func:`lorakern.multi_lora_linear`); anything else is PEFT's own forward, never an approximation,
with a one-time warning per reason.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..backend import warn_once
from ..int4.qalora import qalora_linear
from ..layers import is_bnb_linear4bit
from ..nf4 import plan
from ..nf4.format import NF4Weight
from ..ops import lora_linear, multi_lora_linear, qlora_linear
from ..ops.common import autocast_dtype, autocast_to
from ..ops.multi import stack_ranks
from .gptq import int4_of, is_gptq_linear

_FUSED = "_lorakern_fused"


def _lora_classes() -> tuple[type, ...]:
    """The PEFT layer classes whose math is the fused op's: LoRA ``Linear`` and, with bitsandbytes,
    LoRA ``Linear4bit``. Exact types: a subclass may change the math."""
    from peft.tuners.lora import layer

    classes = [layer.Linear]
    try:
        from peft.tuners.lora import bnb
    except ImportError:
        bnb = None
    if hasattr(bnb, "Linear4bit"):
        classes.append(bnb.Linear4bit)
    try:
        from peft.tuners.lora.gptq import GPTQLoraLinear
    except ImportError:
        return tuple(classes)
    return (*classes, GPTQLoraLinear)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora.layer import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _plain_base(layer) -> nn.Module | None:
    """The layer's own base module when it is one the op computes (``nn.Linear``, NF4
    ``Linear4bit``, a 4-bit GPTQ layer), else None. ``base_layer``, not ``get_base_layer()``: in a
    mixed model the base can itself be an adapter layer (LoHa, LoKr) whose term must not be dropped."""
    base = getattr(layer, "base_layer", None)
    if type(base) is nn.Linear or is_gptq_linear(base):
        return base
    if is_bnb_linear4bit(base) and getattr(base.weight, "quant_type", "nf4") == "nf4":
        return base
    return None


def _gptq_reason(layer) -> str | None:
    """Why a GPTQ layer's base cannot be read as INT4 (see :mod:`.gptq`); None for other bases."""
    base = getattr(layer, "base_layer", None)
    return int4_of(base)[1] if is_gptq_linear(base) else None


def unsupported_reason(layer) -> str | None:
    """Why ``layer`` (a PEFT LoRA layer) cannot be fused at all, or None."""
    if type(layer) not in _lora_classes():
        return f"layer type {type(layer).__module__}.{type(layer).__qualname__} (only PEFT's LoRA Linear is fused)"
    if _plain_base(layer) is None:
        base = getattr(layer, "base_layer", None)
        return (f"base layer {type(base).__name__} (only nn.Linear, bitsandbytes NF4 Linear4bit and 4-bit GPTQ "
                "layers are fused)")
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    reason = _gptq_reason(layer)
    if reason is not None:
        return f"GPTQ base: {reason}"
    forward = layer.__dict__.get("forward")
    if forward is not None and not isinstance(forward, FusedForward):
        return "its forward was replaced by another library (X-LoRA, ...)"
    for adapter in layer.lora_A:
        reason = adapter_reason(layer, adapter)
        if reason is not None:
            return reason
    return None


def adapter_reason(layer, adapter: str) -> str | None:
    """Why the op cannot compute ``adapter`` of ``layer`` (checked at fuse and again at every call,
    since adapters are added after fuse), or None."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    gptq = is_gptq_linear(getattr(layer, "base_layer", None))
    if gptq:  # PEFT's QA-LoRA, pooled over the base's own groups: the merge-exact case the op computes
        if not _is_peft_variant(variant, "QALoraLinearVariant"):
            return f"adapter {adapter!r} on a GPTQ base is not QA-LoRA (use_qalora=True)"
        if layer.qalora_group_size[adapter] != layer.base_layer.group_size:
            return (f"adapter {adapter!r} pools groups of {layer.qalora_group_size[adapter]}, the GPTQ base "
                    f"quantizes groups of {layer.base_layer.group_size}")
    elif variant is not None or layer.use_dora.get(adapter, False):
        if not _is_dora(variant):
            return f"adapter {adapter!r} is a LoRA variant other than DoRA ({type(variant).__name__})"
        vectors = getattr(layer, "lora_magnitude_vector", None) or {}
        magnitude = vectors[adapter] if adapter in vectors else None
        if type(magnitude).__name__ != "DoraLinearLayer" or getattr(magnitude, "fan_in_fan_out", True):
            return f"adapter {adapter!r} has a DoRA magnitude module of type {type(magnitude).__name__}"
    if layer.lora_bias.get(adapter, False):
        return f"adapter {adapter!r} has lora_bias=True"
    A, B, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return f"adapter {adapter!r} is not a pair of bias-free nn.Linear"
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"adapter {adapter!r} has a dropout module of type {type(dropout).__name__}"
    return None


def _is_dora(variant) -> bool:
    """PEFT's DoRA variant of a Linear layer itself (whose math the op implements), not a subclass."""
    return _is_peft_variant(variant, "DoraLinearVariant")


def _is_peft_variant(variant, name: str) -> bool:
    return type(variant).__name__ == name and type(variant).__module__.startswith("peft.")


def _magnitude(layer, adapter: str) -> nn.Module | None:
    """The DoRA magnitude module of ``adapter`` (its ``weight`` is the magnitude [out]), or None."""
    if not _is_dora(getattr(layer, "lora_variant", {}).get(adapter)):
        return None
    return layer.lora_magnitude_vector[adapter]


def _hooked(*modules: nn.Module) -> bool:
    """Whether calling these modules runs code besides their class's forward: hooks (accelerate's
    offload, profilers, global module hooks) or a forward bound on the instance."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


def runtime_reason(layer, x, args, kwargs) -> str | None:
    """Why this call must go to PEFT's forward (None: the fused op serves it). Cheap: attribute
    and dict look-ups, traced by torch.compile without a graph break."""
    if args or kwargs:
        return "extra forward arguments"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged into the base weight"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return "0 active adapters on one layer"
    return _adapters_reason(layer, x, active, several=len(active) > 1)


def _adapters_reason(layer, x, adapters, several: bool) -> str | None:
    """Why the op cannot serve ``adapters`` of ``layer`` on this call (its base, each adapter,
    hooks), or None; ``several``: they are summed on every row."""
    base = _plain_base(layer)
    if base is None:
        return "its base layer is not an nn.Linear, an NF4 Linear4bit or a 4-bit GPTQ layer"
    if is_gptq_linear(base):
        reason = _gptq_reason(layer)
        if reason is not None:
            return f"GPTQ base: {reason}"
        if several:
            return "several active QA-LoRA adapters on a GPTQ layer"
    elif base.weight.requires_grad:
        # FSDP1 with use_orig_params=True hands the layer a view of its flat parameter, which
        # requires grad even when this weight is frozen; PEFT's forward computes what it asks.
        return "the base weight requires grad (not frozen, or a view of an FSDP flat parameter)"
    modules = [base]
    for adapter in adapters:
        magnitude = _magnitude(layer, adapter)
        reason = _active_adapter_reason(layer, adapter, x, several, magnitude)
        if reason is not None:
            return reason
        modules += [layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]]
        if magnitude is not None:
            modules.append(magnitude)
    if _hooked(*modules):
        return "hooks on the base layer or the adapter's modules"
    return None


def _active_adapter_reason(layer, adapter: str, x, several: bool, magnitude) -> str | None:
    """``magnitude``: the adapter's DoRA magnitude module (``_magnitude``), or None."""
    reason = adapter_reason(layer, adapter)
    if reason is not None:
        return reason
    A, B, dropout = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.lora_dropout[adapter]
    active_dropout = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0.0
    if active_dropout and dropout.p >= 1.0:
        return f"adapter {adapter!r} has dropout p={dropout.p} in training (the op takes p < 1)"
    if not getattr(layer, "cast_input_dtype_enabled", True) and A.dtype != x.dtype:
        return "input dtype casting is disabled and the adapter's dtype is not x's"
    if several and (magnitude is not None or active_dropout):
        # Summed adapters are one adapter of rank sum(r_a) only without DoRA and without dropout
        # (each adapter draws its own mask in PEFT).
        return "several active adapters with DoRA or with dropout in training"
    if magnitude is not None and magnitude.weight.dtype != A.dtype:
        return "the DoRA magnitude's dtype is not the adapter's"
    device = x.device
    if A.device != device or B.device != device or (magnitude is not None and magnitude.weight.device != device):
        return "the adapter is on another device than x (ephemeral_gpu_offload, ...)"
    return None


def mixed_batch_reason(layer, x, adapter_names) -> str | None:
    """Why a mixed batch (``adapter_names``, one per sample) must go to PEFT's forward, or None.
    PEFT's own checks run first (they raise for a wrong length, merged adapters, DoRA)."""
    layer._check_forward_args(x, adapter_names=adapter_names)
    if layer.disable_adapters:
        return "adapters disabled"
    if is_gptq_linear(layer.base_layer):
        return "a mixed batch on a GPTQ layer"
    base = layer.base_layer
    if is_bnb_linear4bit(base) and getattr(base, "compute_dtype", None) not in (None, x.dtype):
        return "a mixed batch on a Linear4bit whose compute_dtype is not the input's"
    return _adapters_reason(layer, x, sorted(set(adapter_names) & set(layer.lora_A)), several=False)


def fused_mixed_forward(layer, x: torch.Tensor, adapter_names) -> torch.Tensor:
    """PEFT's mixed batch through :func:`lorakern.multi_lora_linear`: sample i of x takes adapter
    ``adapter_names[i]`` ("__base__", or a name the layer lacks: the base alone)."""
    names = [n for n in dict.fromkeys(adapter_names) if n in layer.lora_A]
    slot = {n: i for i, n in enumerate(names)}
    index = torch.tensor([slot.get(n, -1) for n in adapter_names], device=x.device)
    index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    base = layer.base_layer
    if not names:
        return base(x)
    dropouts = [layer.lora_dropout[n] for n in names]
    ps = [d.p if isinstance(d, nn.Dropout) and d.training else 0.0 for d in dropouts]
    scalings = [layer.scaling[n] for n in names]
    if x.device.type == "cuda":  # the Triton kernels take the adapters stacked
        As, Bs, ranks = stacked_adapters(layer, names, x)
    else:
        pairs = [_in_x_dtype(x, layer.lora_A[n].weight, layer.lora_B[n].weight, layer=layer, slot=("mixed", n))
                 for n in names]
        As, Bs, ranks = [A for A, _ in pairs], [B for _, B in pairs], None
    weight = NF4Weight.from_bnb(base) if is_bnb_linear4bit(base) else base.weight
    return multi_lora_linear(x, weight, _bias_in_x_dtype(x, base), As, Bs, scalings, index, ps, training=True,
                             ranks=ranks)


_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (key, stacked A, B)


def stacked_adapters(layer, names, x: torch.Tensor):
    """Adapters ``names`` of ``layer`` stacked as the Triton kernels take them (``A [n, r_max, in]``,
    ``B [n, out, r_max]``, zero-padded, in the dtype they compute in) and their ranks.

    Serving (no adapter needs a grad): written on every call into buffers kept per layer (the same
    addresses call after call, no allocation), as :func:`_cast` does and for its reason: a write
    through ``tensor.data`` (PEFT's ``hotswap_adapter``) leaves no trace in the adapter's version
    counter, so a stack kept until a counter moved would serve a swapped-out adapter. Stacking is a
    copy of ``n * r_max * (in + out)`` elements, which at decode sits beside a base GEMV reading
    ``out * in``: 32 adapters of r=16 on a 4096 x 4096 layer copy 4M elements per call against the
    base's 16.8M. Training stacks into new tensors per call, so that the grads flow back to each
    adapter."""
    weights = [t for n in names for t in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
    dtype = autocast_dtype(x.device.type) or x.dtype
    ranks = [layer.lora_A[n].weight.shape[0] for n in names]
    r_max = max(ranks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in weights):
        return (stack_ranks([t.to(dtype) for t in weights[0::2]], 0, r_max),
                stack_ranks([t.to(dtype) for t in weights[1::2]], 1, r_max), ranks)
    key = (dtype, x.device, tuple(t.shape for t in weights))
    kept = _STACKS.get(layer)
    if kept is None or kept[0] != key or (kept[1].is_inference() and not torch.is_inference_mode_enabled()):
        A0, B0 = weights[0], weights[1]
        kept = (key, torch.zeros(len(names), r_max, A0.shape[1], dtype=dtype, device=x.device),
                torch.zeros(len(names), B0.shape[0], r_max, dtype=dtype, device=x.device))
        _STACKS[layer] = kept
    stacked_A, stacked_B = kept[1], kept[2]
    with torch.no_grad():
        if all(r == r_max for r in ranks):  # one copy each (the usual case: one rank for every adapter)
            torch.stack(weights[0::2], out=stacked_A)
            torch.stack(weights[1::2], out=stacked_B)
        else:  # the padding past each rank stays zero
            for i, r in enumerate(ranks):
                stacked_A[i, :r].copy_(weights[2 * i])
                stacked_B[i, :, :r].copy_(weights[2 * i + 1])
    return stacked_A, stacked_B, ranks


class FusedForward:
    """The ``forward`` of a fused layer: the fused op where it serves the call, else the layer's
    class forward (PEFT's). A module-level class, not a bound function, so that pickling the model
    (``torch.save(model)``) stores it by reference to this class."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer
        if not args and set(kwargs) == {"adapter_names"} and kwargs["adapter_names"] is not None:
            reason = mixed_batch_reason(layer, x, kwargs["adapter_names"])
            if reason is None:
                return fused_mixed_forward(layer, x, kwargs["adapter_names"])
        else:
            reason = runtime_reason(layer, x, args, kwargs)
            if reason is None:
                return fused_lora_forward(layer, x)
        warn_once(f"lorakern.integrations.peft: PEFT's own forward runs for this call ({reason})")
        return type(layer).forward(layer, x, *args, **kwargs)


def _summed(layer, active):
    """Several active adapters (no dropout, no DoRA) as one adapter of rank sum(r_a): A = [A_1; A_2; ...],
    B = [s_1 B_1, s_2 B_2, ...], s = 1, which is sum_a s_a (x A_a^T) B_a^T in one fused call;
    autograd splits the grads back to each adapter's A and B."""
    A = torch.cat([layer.lora_A[a].weight for a in active])
    B = torch.cat([layer.lora_B[a].weight * layer.scaling[a] for a in active], dim=1)
    return A, B


def fused_lora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The fused op on the layer's active adapters (``runtime_reason`` said it serves them)."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    adapter = active[0]
    base = layer.base_layer
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dropout = layer.lora_dropout[adapter]
    # The dropout module's own mode decides, as in PEFT (it can differ from the layer's); PEFT's
    # DoRA applies it only while the layer itself trains, too.
    magnitude = _magnitude(layer, adapter)
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    training = dropout.training if isinstance(dropout, nn.Dropout) else False
    if magnitude is not None:
        magnitude, training = magnitude.weight, training and layer.training
    scaling = layer.scaling[adapter]
    if len(active) > 1:
        (A, B), scaling, p = _summed(layer, active), 1.0, 0.0
    w = NF4Weight.from_bnb(base) if is_bnb_linear4bit(base) else None
    if (w is not None and len(active) == 1 and magnitude is None and not (training and p > 0.0)
            and x.dtype in (torch.float16, torch.bfloat16) and A.dtype == torch.float32 == B.dtype
            and getattr(base, "compute_dtype", None) in (None, x.dtype)):
        # PEFT's float32 adapter beside a half x, served on the CPU: one native call reads it as it
        # is (the term in float32, as PEFT computes it), with no cast per call; the call is kept
        # (lorakern/nf4/plan.py). Elsewhere (grads, dropout, CUDA, rows the kernel does not take)
        # the adapter is cast to x's dtype below.
        y = plan.decode(layer, x, w, base.bias, A, B, scaling, "auto")
        if y is None and plan.mixed_call_takes(x, w, base.bias, A, B):
            y = plan.serve_mixed(layer, x, w, base.bias, A, B, scaling)
        if y is not None:
            return y
    A, B, magnitude = _in_x_dtype(x, A, B, magnitude, layer=layer if len(active) == 1 else None, slot=("one", adapter))
    if is_gptq_linear(base):  # PEFT's QA-LoRA drops out only while the layer itself trains
        return qalora_linear(x, int4_of(base)[0], _bias_in_x_dtype(x, base), A, B, scaling, p,
                             training=training and layer.training)
    if w is not None:
        # bitsandbytes computes the base in its compute_dtype (x is cast to it) and returns x's
        # dtype, the LoRA term is PEFT's in x's dtype: qlora_linear's compute_dtype does both.
        bias = _bias_in_x_dtype(x, base)
        compute_dtype = getattr(base, "compute_dtype", None)
        call = (x, w, bias, A, B, scaling, "auto", training and p > 0.0, magnitude)
        same_dtype = compute_dtype is None or compute_dtype == x.dtype
        y = plan.decode(layer, *call) if same_dtype else None  # the CPU decode call (lorakern/nf4/plan.py)
        if y is not None:
            return y
        y = qlora_linear(x, w, bias, A, B, scaling, p, training=training, compute_dtype=compute_dtype,
                         magnitude=magnitude)
        if same_dtype:
            plan.remember(layer, *call)
        return y
    return lora_linear(x, base.weight, base.bias, A, B, scaling, p, training=training, magnitude=magnitude)


_CASTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {slot: buffers in x's dtype}


def _in_x_dtype(x, A, *others, layer=None, slot=None):
    """An adapter's tensors (A first; None stays None) in x's dtype: PEFT keeps adapters in fp32 on a
    16-bit base, the fused op computes in x's dtype. Under autocast the op casts them itself.

    Serving (no grad needed), the casts are written into buffers kept per ``layer`` and ``slot``
    (:func:`_cast`), so that the CPU decode plan, keyed on the addresses it reads, serves the next
    call. bfloat16 x on fp32 adapters, 8 bitsandbytes 4096 x 4096 layers fused, Zen 4, 2 threads:
    1.08 ms a layer at M = 1 and 7.6 ms at M = 16 with a new cast per call, against 0.85 / 3.6 ms
    for a bfloat16 ``FusedLoRALinear``. (A bitsandbytes base served on the CPU reads the float32
    adapter itself instead: see fused_lora_forward.)"""
    if A.dtype == x.dtype or autocast_dtype(x.device.type) is not None:
        return (A, *others)
    return _cast(x, (A, *others), layer, slot)


def _cast(x, sources: tuple, layer, slot) -> tuple:
    """``sources`` (None stays None) in x's dtype. Serving, written on every call into buffers kept
    on ``layer`` under ``slot`` (the same addresses call after call). Every call copies: whether a
    source changed cannot be told from its version counter, because PEFT writes adapters through
    ``tensor.data`` (``hotswap_adapter``: ``old.data.copy_(new)``), which has a counter of its own;
    kept copies checked by version counter served the old adapter after a hot swap."""
    present = [t for t in sources if t is not None]
    if layer is None or (torch.is_grad_enabled() and any(t.requires_grad for t in present)):
        return autocast_to(x.dtype, *sources)
    slots = _CASTS.setdefault(layer, {})
    kept = slots.get(slot)
    if kept is None or not _buffers_fit(kept, sources, x):
        kept = tuple(None if t is None else torch.empty(t.shape, dtype=x.dtype, device=t.device) for t in sources)
        slots[slot] = kept
    with torch.no_grad():
        for dst, src in zip(kept, sources):
            if src is not None:
                _copy_serially(dst, src)
    return kept


# Elements per copy on the CPU: at most torch's grain size (at::internal::GRAIN_SIZE), so that each
# copy runs on the calling thread. A larger copy is a parallel op, after which torch's OpenMP
# threads spin for a few ms on the cores the next native call wants (see lorakern/nf4/plan.py):
# bfloat16 x, 8 fused bitsandbytes 4096 x 4096 layers, r = 16, Zen 4, 2 threads, interleaved,
# against casts kept by version counter (which missed .data writes): whole-tensor copies 1.35x
# the time at M = 1 and 1.8x at M = 16, these pieces 1.08x-1.16x and 1.03x-1.04x (two runs).
_SERIAL_COPY = 32768


def _copy_serially(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` in pieces of at most ``_SERIAL_COPY`` elements on the CPU."""
    n = dst.numel()
    if dst.device.type != "cpu" or n <= _SERIAL_COPY or not (dst.is_contiguous() and src.is_contiguous()):
        dst.copy_(src)
        return
    d, s = dst.view(-1), src.view(-1)
    for i in range(0, n, _SERIAL_COPY):
        d[i:i + _SERIAL_COPY].copy_(s[i:i + _SERIAL_COPY])


def _buffers_fit(kept: tuple, sources: tuple, x) -> bool:
    """Whether ``kept`` can take ``sources`` cast to x's dtype: one per source, the same shapes and
    device, and writable here (a buffer made under ``torch.inference_mode()`` is an inference
    tensor, which may be written only there)."""
    inference = torch.is_inference_mode_enabled()
    return len(kept) == len(sources) and all(
        (k is None) == (t is None) and (t is None or (k.shape == t.shape and k.dtype == x.dtype
                                                       and k.device == t.device
                                                       and (inference or not k.is_inference())))
        for k, t in zip(kept, sources))


def _bias_in_x_dtype(x, base):
    """A bitsandbytes base's bias (kept in the weight's original dtype) in x's (serving, written
    into a buffer kept per layer on every call, as the adapters' in :func:`_in_x_dtype`)."""
    if base.bias is None or base.bias.dtype == x.dtype:
        return base.bias
    return _cast(x, (base.bias,), base, "bias")[0]


def fuse(model: nn.Module) -> int:
    """Route every fusable PEFT LoRA linear of ``model`` through lorakern, in place. Returns how
    many layers are fused (calling it again fuses only what is new). Warns once, naming the layers
    left to PEFT and why."""
    fused, skipped = 0, {}
    for name, layer in _lora_layers(model):
        if is_fused(layer):
            fused += 1
            continue
        reason = unsupported_reason(layer)
        if reason is not None:
            skipped.setdefault(reason, []).append(name)
            continue
        layer.forward = FusedForward(layer)
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
        if is_fused(layer):
            if isinstance(layer.__dict__.get("forward"), FusedForward):
                del layer.forward
            delattr(layer, _FUSED)
            restored += 1
    return restored


def is_fused(layer: nn.Module) -> bool:
    return getattr(layer, _FUSED, False)
