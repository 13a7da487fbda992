"""Many adapters over one base model: load N PEFT adapter folders into one fused model, and route each
sample of a batch to its own adapter, for serving and for training several adapters in one batch.

    model = load_adapters(base_model, {"support": "ckpt/support", "legal": "ckpt/legal"})
    with mixed_batch(model, ["support", "legal", "__base__"]):    # or by index: [0, 1, -1]
        out = model(**batch)           # eval or train: loss.backward() gives each adapter its samples' grads
    model.save_pretrained("out")      # each adapter a plain PEFT folder: out/<name>/ (PEFT's layout)

``mixed_batch`` is PEFT's ``adapter_names`` (the same routing, through the same layers; fused ones
run :func:`lorakern.multi_lora_linear`, one call per layer for the whole batch) without PEFT's refusal
to train: sample i's rows use adapter i's weights and dropout, so adapter a's grads come from its
samples only, as if each adapter were trained alone on its sub-batch. Adapters may differ in rank,
alpha and target modules (a layer without the sample's adapter gives it the base alone).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from functools import partial

from torch import nn

from . import peft as fused_peft

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def _routed_modules(model: nn.Module):
    """The modules PEFT hands ``adapter_names`` to: LoRA layers and modules_to_save wrappers."""
    from peft.tuners.lora.layer import LoraLayer

    kinds = [LoraLayer]
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
        kinds.append(AuxiliaryTrainingWrapper)
    except ImportError:  # older PEFT: modules_to_save is not routed per sample
        pass
    return [m for m in model.modules() if isinstance(m, tuple(kinds))]


def adapter_order(model: nn.Module) -> list[str]:
    """The model's LoRA adapters in the order they were added (``route`` index i is the i-th)."""
    names = {}
    for module in _routed_modules(model):
        for name in getattr(module, "lora_A", {}):
            names.setdefault(name, None)
    config = getattr(model, "peft_config", None)
    ordered = [n for n in (config or {}) if n in names]
    return ordered + [n for n in names if n not in ordered]


def routes_to_names(model: nn.Module, routes) -> list[str]:
    """One adapter name per sample from ``routes``: names as they are ("__base__": none), ints as
    indices into :func:`adapter_order` (-1: none), or a 1-D integer tensor of them."""
    if hasattr(routes, "tolist") and not isinstance(routes, (list, tuple)):
        if routes.dim() != 1 or routes.dtype.is_floating_point or routes.dtype.is_complex:
            raise ValueError(f"routes: expected a 1-D integer tensor (one adapter per sample), got {routes.dtype} "
                             f"of shape {tuple(routes.shape)}")
        routes = routes.tolist()
    if isinstance(routes, str) or not isinstance(routes, Sequence) or not routes:
        raise ValueError(f"routes: expected one adapter name or index per sample, got {routes!r}")
    order = adapter_order(model)
    names = []
    for i, route in enumerate(routes):
        if isinstance(route, str):
            if route != BASE and route not in order:
                raise ValueError(f"routes[{i}]: no adapter named {route!r} (the model has {order})")
            names.append(route)
        elif isinstance(route, int) and not isinstance(route, bool) and -1 <= route < len(order):
            names.append(BASE if route == -1 else order[route])
        else:
            raise ValueError(f"routes[{i}]: expected an adapter name or an index in [-1, {len(order) - 1}] "
                             f"(-1: the base alone), got {route!r}")
    return names


def _inject(names, module, args, kwargs):
    return args, {**kwargs, "adapter_names": names}


@contextlib.contextmanager
def mixed_batch(model: nn.Module, routes):
    """Inside, every forward of ``model`` routes sample i (x's first dim, in every routed layer) to
    ``routes[i]`` (see :func:`routes_to_names`), in eval and in training mode. Gradient
    checkpointing is refused in training: its recomputation in backward runs after this context has
    ended, without the routing."""
    names = routes_to_names(model, routes)
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError("mixed_batch: gradient checkpointing is on; its backward recomputes the forward outside "
                         "the routing (turn it off, or train one adapter per batch)")
    handles = [m.register_forward_pre_hook(partial(_inject, names), with_kwargs=True) for m in _routed_modules(model)]
    try:
        yield names
    finally:
        for handle in handles:
            handle.remove()


def load_adapters(model: nn.Module, adapters, is_trainable: bool = False, fuse: bool = True):
    """A PeftModel over ``model`` with every adapter of ``adapters`` loaded (a mapping name -> PEFT
    folder, or a sequence of folders, each named by its folder's base name), fused by
    :func:`lorakern.integrations.peft.fuse` unless ``fuse=False``. The first adapter is active;
    route samples with :func:`mixed_batch`. ``is_trainable``: load them for further training."""
    from peft import PeftModel

    if isinstance(adapters, Mapping):
        items = list(adapters.items())
    elif isinstance(adapters, Sequence) and not isinstance(adapters, str):
        items = [(os.path.basename(os.path.normpath(str(path))), path) for path in adapters]
    else:
        raise TypeError(f"adapters: expected a mapping name -> folder or a sequence of folders, got "
                        f"{type(adapters).__name__}")
    if not items:
        raise ValueError("adapters: expected at least one adapter folder")
    names = [name for name, _ in items]
    if len(set(names)) != len(names) or BASE in names:
        raise ValueError(f"adapters: expected distinct names other than {BASE!r}, got {names}")
    (first, path), rest = items[0], items[1:]
    peft_model = PeftModel.from_pretrained(model, path, adapter_name=first, is_trainable=is_trainable)
    for name, path in rest:
        peft_model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
    if fuse:
        fused_peft.fuse(peft_model)
    return peft_model


__all__ = ["adapter_order", "load_adapters", "mixed_batch", "routes_to_names"]
