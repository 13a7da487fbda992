"""``QALoRALinear``: a QA-LoRA layer over a group-wise INT4 base, the module form of
:func:`lorakern.qalora_linear`, with a merge that keeps the base 4-bit."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backend import BACKENDS
from ..layers import lora_scaling
from .format import INT4Weight
from .qalora import merge_into, qalora_linear


class QALoRALinear(nn.Module):
    """``y = x W^T + bias + s * (pool_G(dropout(x)) A^T) B^T`` with W an :class:`INT4Weight`
    (``self.weight_int4``, frozen), ``lora_A [r, in / G]``, ``lora_B [out, r]`` (PEFT's
    ``use_qalora`` shapes and init: A kaiming-uniform, B zeros); ``backend`` as for
    :func:`lorakern.qalora_linear`. :meth:`merge` folds the adapter
    into the INT4 zero points (exact to fp32 rounding) and zeroes B, so the layer then computes the
    base alone and stays 4-bit."""

    def __init__(self, weight: INT4Weight, bias: torch.Tensor | None = None, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, dtype: torch.dtype = torch.float32,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(weight, INT4Weight):
            raise TypeError(f"weight: expected an INT4Weight, got {type(weight).__name__}")
        if r < 1:
            raise ValueError(f"r: expected >= 1, got {r}")
        if backend not in ("auto", *BACKENDS["QA-LoRA"]):
            raise ValueError(f"backend: expected one of {('auto', *BACKENDS['QA-LoRA'])}, got {backend!r}")
        out_features, in_features = weight.shape
        self.weight_int4 = weight
        self.in_features, self.out_features, self.group_size = in_features, out_features, weight.group_size
        self.r, self.lora_alpha, self.lora_dropout, self.backend = r, lora_alpha, lora_dropout, backend
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        device = weight.device
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, dtype).clone(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(r, in_features // weight.group_size, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, group_size: int = 64,
                    lora_dropout: float = 0.0, symmetric: bool = False, backend: str = "auto") -> QALoRALinear:
        """Quantize ``linear.weight`` to INT4 (round to nearest, per group) under a new adapter."""
        weight = INT4Weight.quantize(linear.weight.detach(), group_size, symmetric)
        return cls(weight, linear.bias, r, lora_alpha, lora_dropout, dtype=linear.weight.dtype, backend=backend)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s B A`` into the base's zero points and zero B (A is kept: training can go on)."""
        self.weight_int4 = merge_into(self.weight_int4, self.lora_A, self.lora_B, self.scaling)
        self.lora_B.zero_()

    def _apply(self, fn, recurse=True):
        """``.to(device)`` / ``.cuda()`` move the INT4 tensors too (they are not Parameters); as in
        FusedLoRALinear, only the device follows, learnt by applying fn to an empty probe."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.weight_int4.device)).device
        if device != self.weight_int4.device:
            self.weight_int4 = self.weight_int4.to(device)
        return self

    # The INT4 weight is not a Parameter (a frozen 4-bit tensor set), so the state_dict carries it
    # by hand: a merged layer's zero points are the adapter's work, and a state without them would
    # load the unmerged base under a zeroed B.
    _WEIGHT_PREFIX = "weight_int4."

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.weight_int4.state_dict(prefix + self._WEIGHT_PREFIX))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wp = prefix + self._WEIGHT_PREFIX
        keys = [k for k in state_dict if k.startswith(wp)]
        if keys:
            try:
                loaded = INT4Weight.from_state_dict(state_dict, wp)
            except (KeyError, TypeError, ValueError) as e:
                error_msgs.append(f"{wp[:-1]}: {e}")
            else:
                if tuple(loaded.shape) != (self.out_features, self.in_features) or loaded.group_size != self.group_size:
                    error_msgs.append(f"{wp[:-1]}: INT4 shape {tuple(loaded.shape)} with group_size "
                                      f"{loaded.group_size}, expected {(self.out_features, self.in_features)} with "
                                      f"group_size {self.group_size}")
                else:
                    self.weight_int4 = loaded.to(self.weight_int4.device)
            state_dict = {k: v for k, v in state_dict.items() if k not in keys}
        elif strict:  # a state without the base (adapter weights only, strict=False) keeps this one
            missing_keys.extend(wp + k for k in INT4Weight.STATE_KEYS)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qalora_linear(x, self.weight_int4, self.bias, self.lora_A.to(x.dtype), self.lora_B.to(x.dtype),
                             self.scaling, self.lora_dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, backend={self.backend!r}")
