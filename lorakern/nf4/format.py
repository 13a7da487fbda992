"""``NF4Weight``: a 4-bit NF4 weight in bitsandbytes' byte layout, and its state_dict.

Memory per weight: 4 bits + 32 bits / blocksize of absmax (64: 4.5 bits, ~3.6x below bf16), or
4 + 8/blocksize + 32/(blocksize*256) bits with double quantization (64: ~4.127 bits).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch

from ..backend import FLOAT_DTYPES, resolve_nf4
from ..stamp import stamp
from . import native
from .reference import (
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    dequantize_nf4,
    dynamic_code,
    nested_absmax_values,
    nf4_code,
    quantize_blockwise_8bit,
    quantize_nf4,
)

_QS_KEY = "quant_state.bitsandbytes__nf4"  # bitsandbytes packs the non-tensor items here


def _layout(t: torch.Tensor) -> str:
    """``shape (...)``, with the strides when the tensor is not contiguous (for error messages)."""
    return f"shape {tuple(t.shape)}" + ("" if t.is_contiguous() else f", strides {t.stride()} (not contiguous)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_DTYPES = {_dtype_name(d): d for d in FLOAT_DTYPES}


def _read_quant_state(state: dict, key: str) -> dict:
    """The JSON item bitsandbytes packs into ``key`` (a uint8 tensor), checked field by field:
    every way it can be corrupt is one ValueError naming ``key``."""
    item = state[key]

    def bad(why: str) -> ValueError:
        return ValueError(f"state_dict: {key}: {why}")

    if not isinstance(item, torch.Tensor) or item.dtype != torch.uint8:
        raise bad(f"expected a uint8 tensor of JSON bytes, got {getattr(item, 'dtype', type(item).__name__)}")
    try:
        meta = json.loads(bytes(item.reshape(-1).cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("quant_type") != "nf4":
        raise bad(f"quant_type {meta.get('quant_type')!r} is not 'nf4'")
    if meta.get("dtype") not in _DTYPES:
        raise bad(f"dtype {meta.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    if meta.get("blocksize") not in BLOCKSIZES:
        raise bad(f"blocksize {meta.get('blocksize')!r} is not one of {BLOCKSIZES}")
    shape = meta.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of positive integers")
    if "nested_offset" in meta:
        off = meta["nested_offset"]
        if not isinstance(off, (int, float)) or isinstance(off, bool) or not math.isfinite(off):
            raise bad(f"nested_offset {off!r} is not a finite number")
    return meta


class NF4Weight:
    """A frozen weight stored as NF4, byte-compatible with ``bitsandbytes.functional.quantize_4bit``.

    Attributes:
        packed: ``uint8 [ceil(numel/2)]``, two code indices per byte, high nibble first.
        absmax: ``float32 [n_blocks]``, or ``uint8 [n_blocks]`` when double-quantized.
        nested_absmax: ``float32 [ceil(n_blocks/256)]`` (double quantization only).
        nested_code: ``float32 [256]`` bitsandbytes' dynamic code (double quantization only).
        offset: ``float32 []`` the mean subtracted from absmax before it was quantized (double only).
        shape: the original shape; dtype: the original (and compute) dtype; blocksize.
    """

    def __init__(
        self, packed, absmax, shape: Sequence[int], dtype: torch.dtype, blocksize: int,
        nested_absmax=None, nested_code=None, offset=None,
    ):
        self.packed, self.absmax = packed, absmax
        self.nested_absmax, self.nested_code, self.offset = nested_absmax, nested_code, offset
        self.shape, self.dtype, self.blocksize = torch.Size(shape), dtype, int(blocksize)
        self.validate()
        native.back_with_huge_pages(self.packed)

    @classmethod
    def _trusted(cls, packed, absmax, shape, dtype, blocksize, nested_absmax=None, nested_code=None,
                 offset=None) -> NF4Weight:
        """Rebuild from pieces of an already validated NF4Weight (inside ops), skipping the checks."""
        self = cls.__new__(cls)
        self.packed, self.absmax = packed, absmax
        self.nested_absmax, self.nested_code, self.offset = nested_absmax, nested_code, offset
        self.shape, self.dtype, self.blocksize = torch.Size(shape), dtype, int(blocksize)
        return self

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
        """Quantize ``weight`` (fp16/bf16/fp32, any shape) blockwise to NF4."""
        if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
            got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"weight: expected a float16, bfloat16 or float32 tensor, got {got}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize: expected one of {BLOCKSIZES}, got {blocksize}")
        if weight.numel() == 0:
            raise ValueError(f"weight: expected a non-empty tensor, got shape {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError("weight: contains inf or NaN; NF4 cannot represent it")
        with torch.no_grad():
            packed, absmax = quantize_nf4(weight.detach(), blocksize)
            if not double_quant:
                return cls(packed, absmax, weight.shape, weight.dtype, blocksize)
            offset = absmax.mean()
            if not torch.isfinite(offset):
                # bitsandbytes returns NaN scales here; an index of int64-min followed downstream.
                raise ValueError(
                    f"weight: with double_quant=True the mean of its block absmax values overflows float32 "
                    f"(largest |w| = {absmax.max().item():.3g}); quantize without double_quant or rescale it")
            code = dynamic_code(weight.device)
            q, nested_absmax = quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
        return cls(packed, q, weight.shape, weight.dtype, blocksize, nested_absmax, code, offset)

    @classmethod
    def from_bnb(cls, obj) -> NF4Weight:
        """Wrap a bitsandbytes ``Params4bit`` or ``Linear4bit`` (NF4, quantized) without re-quantizing."""
        weight = getattr(obj, "weight", obj)
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("from_bnb: expected a quantized bitsandbytes Params4bit or Linear4bit "
                             "(move it to a device or call .quantize first); it has no quant_state")
        if qs.quant_type != "nf4":
            raise ValueError(f"from_bnb: only quant_type 'nf4' is supported, got {qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            return _from_bnb_cpu_packing(cls, weight, qs)
        packed = weight.data.reshape(-1)
        if packed.dtype != torch.uint8:  # quant_storage other than uint8: the bytes are the same
            packed = packed.view(torch.uint8)
        if qs.nested:
            if qs.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"from_bnb: nested blocksize {qs.state2.blocksize} is not {NESTED_BLOCKSIZE}")
            return cls(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize,
                       qs.state2.absmax, qs.state2.code, torch.as_tensor(qs.offset, dtype=torch.float32))
        return cls(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize)

    # -- the format -----------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        tensors = [self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def validate(self) -> None:
        """Check that the pieces describe one consistent NF4 tensor; raise naming what is wrong."""
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {self.dtype}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize: expected one of {BLOCKSIZES}, got {self.blocksize}")
        if self.numel == 0:
            raise ValueError(f"shape: expected a non-empty shape, got {tuple(self.shape)}")
        p = self.packed
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8:
            raise TypeError(f"packed: expected a uint8 tensor, got {getattr(p, 'dtype', type(p).__name__)}")
        if p.dim() != 1 or not p.is_contiguous():
            raise ValueError(f"packed: expected a contiguous 1-D tensor, got {_layout(p)}")
        if p.numel() != -(-self.numel // 2):
            raise ValueError(f"packed: expected {-(-self.numel // 2)} bytes for shape {tuple(self.shape)}, "
                             f"got {p.numel()}")
        a = self.absmax
        want = torch.uint8 if self.double_quant else torch.float32
        if not isinstance(a, torch.Tensor) or a.dtype != want:
            raise TypeError(f"absmax: expected {want} (double_quant={self.double_quant}), "
                            f"got {getattr(a, 'dtype', type(a).__name__)}")
        if a.dim() != 1 or a.numel() != self.n_blocks or not a.is_contiguous():
            raise ValueError(f"absmax: expected a contiguous 1-D tensor of {self.n_blocks} blocks "
                             f"(numel {self.numel} / blocksize {self.blocksize}), got {_layout(a)}")
        tensors = {"absmax": a}
        if self.double_quant:
            n2 = -(-self.n_blocks // NESTED_BLOCKSIZE)
            checks = (("nested_absmax", self.nested_absmax, (n2,)), ("nested_code", self.nested_code, (256,)),
                      ("offset", self.offset, ()))
            for name, t, shape in checks:
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                    raise TypeError(f"{name}: expected a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
                if tuple(t.shape) != shape or not t.is_contiguous():
                    raise ValueError(f"{name}: expected a contiguous tensor of shape {list(shape)}, "
                                     f"got {_layout(t)}")
                tensors[name] = t
        elif self.nested_code is not None or self.offset is not None:
            raise ValueError("nested_code / offset given without nested_absmax")
        for name, t in tensors.items():
            if t.device != p.device:
                raise ValueError(f"{name}: expected device {p.device} (the device of packed), got {t.device}")

    def absmax_float(self) -> torch.Tensor:
        """The per-block float32 scales (decoding the double quantization if any)."""
        if not self.double_quant:
            return self.absmax
        return nested_absmax_values(self.absmax, self.nested_absmax, self.nested_code, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
        """The weight in ``dtype`` (default: the original dtype), shape ``self.shape``: the op
        ``lorakern::nf4_dequantize`` (:mod:`lorakern.ops.nf4` registers it; importing lorakern imports that),
        on the backend ``lorakern.backend.resolve_nf4`` picks."""
        self.validate()
        dtype = dtype or self.dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, bfloat16 or float32, got {dtype}")
        chosen = resolve_nf4(backend, self.device)
        return torch.ops.lorakern.nf4_dequantize(self.packed, self.absmax, self.nested_absmax, self.nested_code,
                                                 self.offset, self.blocksize, list(self.shape), dtype, chosen)

    def dequantize_reference(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.packed, self.absmax_float(), self.blocksize, self.shape, dtype or self.dtype)

    def to(self, device) -> NF4Weight:
        move = lambda t: None if t is None else t.to(device)
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                         move(self.nested_absmax), move(self.nested_code), move(self.offset))

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"packed": self.packed, "absmax": self.absmax, "nested_absmax": self.nested_absmax,
                 "nested_code": self.nested_code, "offset": self.offset}
        return {k: v for k, v in named.items() if v is not None}

    # -- serialization: bitsandbytes' Linear4bit keys --------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The keys bitsandbytes' ``Linear4bit`` writes for its weight (``prefix`` + ``weight``,
        ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and the packed JSON item)."""
        key = prefix + "weight"
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        out = {key: self.packed.view(-1, 1), f"{key}.absmax": self.absmax, f"{key}.quant_map": nf4_code(self.device)}
        if self.double_quant:
            out[f"{key}.nested_absmax"] = self.nested_absmax
            out[f"{key}.nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
        data = json.dumps(meta).encode("utf-8")
        out[f"{key}.{_QS_KEY}"] = torch.tensor(list(data), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state: dict, prefix: str = "") -> NF4Weight:
        """Inverse of :meth:`state_dict`; also reads a bitsandbytes ``Linear4bit`` state_dict."""
        key = prefix + "weight"
        need = [key, f"{key}.absmax", f"{key}.{_QS_KEY}"]
        missing = [k for k in need if k not in state]
        if missing:
            raise KeyError(f"state_dict: missing NF4 keys {missing}")
        meta = _read_quant_state(state, f"{key}.{_QS_KEY}")
        quant_map = state.get(f"{key}.quant_map")
        if quant_map is not None and (not isinstance(quant_map, torch.Tensor) or quant_map.numel() != 16
                                      or not torch.equal(quant_map.float().cpu(), nf4_code())):
            raise ValueError(f"state_dict: {key}.quant_map is not the NF4 code")
        dtype = _DTYPES[meta["dtype"]]
        packed = state[key]
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"state_dict: {key}: expected a uint8 tensor, got {type(packed).__name__}")
        packed = packed.reshape(-1)
        nested = "nested_offset" in meta
        try:
            if not nested:
                return cls(packed, state[f"{key}.absmax"], meta["shape"], dtype, meta["blocksize"])
            if meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize {meta.get('nested_blocksize')} is not {NESTED_BLOCKSIZE}")
            for k in ("nested_absmax", "nested_quant_map"):
                if f"{key}.{k}" not in state:
                    raise KeyError(f"missing {key}.{k} (the item says the weight is double-quantized)")
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
            return cls(packed, state[f"{key}.absmax"], meta["shape"], dtype, meta["blocksize"],
                       state[f"{key}.nested_absmax"], state[f"{key}.nested_quant_map"].float(), offset)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"state_dict: the NF4 weight under {key!r} is inconsistent: {exc}") from exc

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device}, bytes={self.nbytes()})")


# bitsandbytes (0.50) on a CPU with AVX512-BF16 rewrites a Linear4bit in place at its first eval
# forward without grad: the codes regrouped for its GEMV (32 rows x 2 columns per 64 nibbles, a
# group's 32 low nibbles then its 32 high ones), the absmax [out, in / blocksize] transposed and
# rounded to bfloat16, double quantization undone, quant_state.packing_format_for_cpu = True. What
# it computes from then on is that weight, so it is read as plain NF4 with those scales (bfloat16
# values, exact in float32). The rewrite is a copy of the bytes, kept on the Params4bit while its
# tensors are the same and unchanged.
_CPU_PACKING_CACHE = "_lorakern_nf4_from_cpu_packing"


def _from_bnb_cpu_packing(cls, weight, qs) -> NF4Weight:
    key = stamp(weight, qs.absmax)
    cached = weight.__dict__.get(_CPU_PACKING_CACHE)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    out_f, in_f = qs.shape
    if len(qs.shape) != 2 or out_f % 32 or in_f % qs.blocksize or qs.nested:
        raise ValueError(f"from_bnb: a bitsandbytes CPU-packed weight of shape {tuple(qs.shape)} "
                         f"(blocksize {qs.blocksize}, nested={qs.nested}) is not a layout this reads")
    nibbles = weight.data.reshape(-1).view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=1)  # [groups, 64]: low nibbles, then high
    codes = codes.reshape(out_f // 32, in_f // 2, 32, 2).transpose(1, 2).reshape(-1)  # row-major codes
    packed = (codes[0::2] << 4) | codes[1::2]  # bitsandbytes' byte: the earlier weight in the high nibble
    absmax = qs.absmax.t().reshape(-1).float()  # [out, in / blocksize] row-major: block order
    w = cls(packed.contiguous(), absmax.contiguous(), qs.shape, getattr(qs, "original_dtype", qs.dtype),
            qs.blocksize)
    if key is not None:
        weight.__dict__[_CPU_PACKING_CACHE] = (key, w)
    return w
