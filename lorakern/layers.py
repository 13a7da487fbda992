"""``FusedLoRALinear``: a drop-in for a LoRA-wrapped ``nn.Linear`` (PEFT's LoRA ``Linear``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .nf4 import plan
from .nf4.format import NF4Weight
from .ops import dora, lora_linear, qlora_linear
from .ops.bases import DenseBase, NF4Base
from .ops.common import Adapter

BASE_QUANTS = (None, "nf4")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA (PEFT's convention)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class FusedLoRALinear(nn.Module):
    """``y = x W^T + bias + s * (dropout(x) A^T) B^T`` with W frozen, in one fused op.

    Parameters: ``weight [out, in]`` (frozen), ``bias [out]`` or None, ``lora_A [r, in]``,
    ``lora_B [out, r]``. ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
    Initialised as PEFT does: A kaiming-uniform (a=sqrt(5)) or normal(std=1/r) for
    ``init_lora_weights="gaussian"``, B zeros, so a fresh layer equals its base layer.

    QLoRA: with ``base_quant="nf4"`` the base weight is stored as :class:`lorakern.NF4Weight`
    (``self.weight_nf4``, ``self.weight`` is None) in bitsandbytes' layout and state_dict keys;
    ``blocksize`` and ``double_quant`` as in :meth:`NF4Weight.quantize`. Compute runs in the
    original weight dtype (the LoRA parameters' dtype).

    DoRA: with ``use_dora=True`` the layer also trains ``lora_magnitude_vector [out]`` (PEFT's
    name), initialised to ``||W + s B A||`` per output row, and computes
    ``y = (m / ||W + s B A||_row) * (x W^T + s x A^T B^T) + bias`` (see :func:`lorakern.lora_linear`;
    dropout as PEFT applies it). ``merge`` writes PEFT's merged weight ``(m / n) (W + s B A)``.
    """

    def __init__(
        self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
        init_lora_weights: bool | str = True, backend: str = "auto", device=None, dtype=None,
        base_quant: str | None = None, blocksize: int = 64, double_quant: bool = False, use_dora: bool = False,
    ):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        weight = _maybe_quantize(base.weight, base_quant, blocksize, double_quant)
        self._setup(weight, base.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, use_dora)

    def _setup(self, weight, bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, use_dora):
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected an integer >= 1, got {r!r}")
        if not (0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights: expected True, False or 'gaussian', got {init_lora_weights!r}")
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora: expected a bool, got {use_dora!r}")
        self.out_features, self.in_features = weight.shape
        if isinstance(weight, NF4Weight):
            self.weight_nf4, self.weight = weight, None
        else:
            weight.requires_grad_(False)
            self.weight_nf4, self.weight = None, weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.bias = bias
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory)) if use_dora else None
        self.merged = False
        self._decode_plan = None  # lorakern.nf4.plan: the CPU decode call's arguments, once served
        self._merged_norm = None  # DoRA: the weight norm merge() used, which unmerge() needs
        self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
        use_rslora: bool = False, init_lora_weights: bool | str = True, backend: str = "auto",
        base_quant: str | None = None, blocksize: int = 64, double_quant: bool = False, use_dora: bool = False,
    ) -> FusedLoRALinear:
        """Wrap ``linear``, sharing (not copying) its weight and bias; the weight is frozen in place.

        ``linear`` is an ``nn.Linear`` (quantized to NF4 first when ``base_quant="nf4"``) or a
        bitsandbytes ``Linear4bit`` with NF4 weights (wrapped as is, without re-quantizing).
        """
        if is_bnb_linear4bit(linear):
            weight = NF4Weight.from_bnb(linear)
        elif isinstance(linear, nn.Linear):
            weight = _maybe_quantize(linear.weight, base_quant, blocksize, double_quant)
        else:
            raise TypeError(f"linear: expected an nn.Linear or a bitsandbytes Linear4bit, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight, linear.bias, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend,
                    use_dora)
        return self

    @property
    def base_quant(self) -> str | None:
        return None if self.weight_nf4 is None else "nf4"

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

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
        if self.use_dora:  # PEFT: m = ||W + s B A|| of the initial adapter, so y starts as LoRA's
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def _base(self):
        return DenseBase(self.weight) if self.weight_nf4 is None else NF4Base(self.weight_nf4)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """DoRA's ``||W + s B A||`` per output row [out] (fp32; float64 for a float64 layer), from the
        unmerged base weight."""
        if self.merged:
            raise RuntimeError("weight_norm: the layer is merged; unmerge() first")
        adapter = Adapter(self.lora_A, self.lora_B, self.scaling, 0.0, None)
        return dora.weight_norm(self._base(), adapter, "reference" if self.backend == "reference" else "native",
                                self.compute_dtype)

    def _base_dtype(self) -> torch.dtype:
        return self.compute_dtype if self.weight is None else self.weight.dtype

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``s * B A`` [out, in], computed in at least fp32, returned in ``dtype`` (default: the weight's)."""
        wide = torch.promote_types(self._base_dtype(), torch.float32)
        delta = (self.lora_B.to(wide) @ self.lora_A.to(wide)) * self.scaling
        return delta.to(self._base_dtype() if dtype is None else dtype)

    def _no_inplace_merge(self):
        if self.weight_nf4 is not None:
            raise RuntimeError("merge/unmerge: the NF4 base cannot absorb the adapter without re-quantizing it; "
                               "use to_linear() for a merged (dequantized) nn.Linear")

    def _dora_factor(self, norm: torch.Tensor) -> torch.Tensor:
        """``m / n`` [out, 1] in at least fp32."""
        return (self.lora_magnitude_vector.to(norm.dtype) / norm)[:, None]

    def merged_weight(self, norm: torch.Tensor | None = None) -> torch.Tensor:
        """The weight a merged layer holds [out, in], in the weight's dtype: ``W + s B A``, for DoRA
        ``(m / n) (W + s B A)`` (PEFT's merge; ``norm``: n, default :meth:`weight_norm`), computed in
        at least fp32."""
        base = self.weight if self.weight_nf4 is None else self.weight_nf4.dequantize(self.compute_dtype)
        dtype = torch.promote_types(base.dtype, torch.float32)
        merged = base.to(dtype) + self.delta_weight(dtype)
        if self.use_dora:
            merged = merged * self._dora_factor(self.weight_norm() if norm is None else norm)
        return merged.to(base.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (inference); forward is then a plain linear."""
        self._no_inplace_merge()
        if not self.merged:
            if self.use_dora:
                self._merged_norm = self.weight_norm().clone()
            self.weight.copy_(self.merged_weight(self._merged_norm))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._no_inplace_merge()
        if self.merged:
            if self.use_dora:
                if self._merged_norm is None:
                    raise RuntimeError("unmerge: the weight norm this DoRA layer was merged with is unknown")
                dtype = self._merged_norm.dtype
                base = self.weight.to(dtype) / self._dora_factor(self._merged_norm) - self.delta_weight(dtype)
                self.weight.copy_(base)
                self._merged_norm = None
            else:
                self.weight.sub_(self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding the merged weight (:meth:`merged_weight`) and a copy of the
        bias; an NF4 base is dequantized first."""
        weight = self.weight if self.merged else self.merged_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def merged_nf4(self) -> NF4Weight:
        """The merged weight (:meth:`merged_weight`, computed in fp32) quantized again to NF4 with this
        layer's blocksize and double quantization (default 64, none for a dense base): a 4-bit model
        out of a QLoRA fine-tune, in bitsandbytes' layout. Not exact: re-quantizing rounds the
        adapter's update to the NF4 grid; ``benchmarks/nf4_merge_error.py`` measures how much (README,
        Limitations)."""
        w = self.weight_nf4
        if w is None:
            merged = (self.weight if self.merged else self.merged_weight()).float()
        else:  # in fp32 throughout, not in the compute dtype merged_weight returns
            merged = w.dequantize(torch.float32) + self.delta_weight(torch.float32)
            if self.use_dora:
                merged = merged * self._dora_factor(self.weight_norm().float())
        return NF4Weight.quantize(merged, w.blocksize if w is not None else 64,
                                  w.double_quant if w is not None else False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_nf4 is not None:
            call = (x, self.weight_nf4, self.bias, self.lora_A, self.lora_B, self.scaling, self.backend,
                    self.training and self.lora_dropout > 0.0, self.lora_magnitude_vector)
            y = plan.decode(self, *call)  # the CPU decode call, when this layer's plan serves x
            if y is not None:
                return y
            y = qlora_linear(
                x, self.weight_nf4, self.bias, self.lora_A, self.lora_B, self.scaling,
                dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
                magnitude=self.lora_magnitude_vector,
            )
            plan.remember(self, *call)
            return y
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
            dropout_p=self.lora_dropout, training=self.training, backend=self.backend,
            magnitude=self.lora_magnitude_vector,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
            f"use_rslora={self.use_rslora}, use_dora={self.use_dora}, backend={self.backend!r}, merged={self.merged}"
            + ("" if self.weight_nf4 is None else f", base_quant='nf4', blocksize={self.weight_nf4.blocksize}, "
               f"double_quant={self.weight_nf4.double_quant}")
        )

    # -- the NF4 base: moved with the module, saved under bitsandbytes' Linear4bit keys ----------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.weight_nf4 is not None:
            # Only the device follows (module.half() must not cast the packed bytes or the absmax):
            # learn the target device by applying fn to an empty probe.
            device = fn(torch.empty(0, device=self.weight_nf4.device)).device
            if device != self.weight_nf4.device:
                self.weight_nf4 = self.weight_nf4.to(device)
        return self

    # -- merged: a merged layer's state says so (key "merged"), so that loading it never adds the
    # adapter a second time; an unmerged state keeps nn.Linear's keys plus lora_A / lora_B.
    _MERGED_KEY = "merged"
    _MERGED_NORM_KEY = "merged_weight_norm"  # DoRA: the norm merge() divided by (unmerge needs it)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + self._MERGED_KEY] = torch.tensor(True)
            if self._merged_norm is not None:
                destination[prefix + self._MERGED_NORM_KEY] = self._merged_norm
        if self.weight_nf4 is not None:
            destination.update(self.weight_nf4.state_dict(prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.weight_nf4 is not None:
            keys = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
            if prefix + "weight" in state_dict:
                loaded = NF4Weight.from_state_dict(state_dict, prefix)
                if tuple(loaded.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{prefix}weight: NF4 shape {tuple(loaded.shape)} != "
                                      f"{(self.out_features, self.in_features)}")
                else:
                    self.weight_nf4 = loaded.to(self.weight_nf4.device)
            elif strict:
                missing_keys.append(prefix + "weight")
            state_dict = {k: v for k, v in state_dict.items() if k not in keys}
        key = prefix + self._MERGED_KEY
        # The flag describes the weight beside it: a weight without it is the base alone (unmerged);
        # a state without the weight (adapter weights only, strict=False) leaves the flag as it is.
        merged = state_dict.get(key, torch.tensor(False if prefix + "weight" in state_dict else self.merged))
        if not isinstance(merged, torch.Tensor) or merged.numel() != 1 or merged.dtype != torch.bool:
            error_msgs.append(f"{key}: expected a one-element bool tensor, got {merged!r}")
        elif bool(merged) and self.weight_nf4 is not None:
            error_msgs.append(f"{key}: True for an NF4 base, which never merges in place")
        else:
            self.merged = bool(merged)
            norm_key = prefix + self._MERGED_NORM_KEY
            if self.merged and self.use_dora:
                norm = state_dict.get(norm_key)
                self._merged_norm = None if norm is None else norm.to(self.lora_A.device)
            elif not self.merged:
                self._merged_norm = None
        state_dict = {k: v for k, v in state_dict.items() if k not in (key, prefix + self._MERGED_NORM_KEY)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _maybe_quantize(weight: torch.Tensor, base_quant, blocksize: int, double_quant: bool):
    if base_quant not in BASE_QUANTS:
        raise ValueError(f"base_quant: expected one of {BASE_QUANTS}, got {base_quant!r}")
    if base_quant is None:
        return weight
    return NF4Weight.quantize(weight.detach(), blocksize=blocksize, double_quant=double_quant)


def is_bnb_linear4bit(module) -> bool:
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)
