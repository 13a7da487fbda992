"""``FusedLoRALinear``: a drop-in for a LoRA-wrapped ``nn.Linear`` (PEFT's LoRA ``Linear``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops import lora_linear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA (PEFT's convention)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class FusedLoRALinear(nn.Module):
    """``y = x W^T + bias + s * (dropout(x) A^T) B^T`` with W frozen, in one fused op.

    Parameters: ``weight [out, in]`` (frozen), ``bias [out]`` or None, ``lora_A [r, in]``,
    ``lora_B [out, r]``. ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
    Initialised as PEFT does: A kaiming-uniform (a=sqrt(5)) or normal(std=1/r) for
    ``init_lora_weights="gaussian"``, B zeros, so a fresh layer equals its base layer.
    """

    def __init__(
        self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
        init_lora_weights: bool | str = True, backend: str = "auto", device=None, dtype=None,
    ):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend)

    def _setup(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend):
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected an integer >= 1, got {r!r}")
        if not (0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights: expected True, False or 'gaussian', got {init_lora_weights!r}")
        self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.merged = False
        self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
        use_rslora: bool = False, init_lora_weights: bool | str = True, backend: str = "auto",
    ) -> FusedLoRALinear:
        """Wrap ``linear``, sharing (not copying) its weight and bias; the weight is frozen in place."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend)
        return self

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:  # PEFT: B random too, so the adapter is not a no-op
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` [out, in], computed in at least fp32, returned in the weight's dtype."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (inference); forward is then a plain linear."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding ``W + s B A`` (and a copy of the bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        weight = self.weight if self.merged else self.weight + self.delta_weight()
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
            dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, backend={self.backend!r}, merged={self.merged}"
        )
