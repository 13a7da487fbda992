"""``INT4Weight``: a group-wise asymmetric INT4 weight with a float zero point per group.

    W[o, i] = scales[o, g] * (q[o, i] - zeros[o, g]),   g = i // group_size,   q in 0..15

Storage: ``codes`` uint8 ``[out, in / 2]``, two codes a byte, column ``2j`` in the high nibble and
``2j + 1`` in the low one (NF4's byte layout, so the native NF4 kernels read INT4 codes as they
are, with the table 0..15 in place of NF4's values); ``scales`` and ``zeros`` float32
``[out, in / group_size]``. At G = 64 that is 4 + 64/64 = 5 bits a weight, ~3.2x below bf16.

Why a float zero point: QA-LoRA's adapter term is constant within a group (it sees x averaged over
each group), so merging it is a shift of each group's zero point, ``zero' = zero - delta / scale``.
A float zero takes that shift exactly (to fp32 rounding); GPTQ's integer ``qzeros`` would round it
(:meth:`INT4Weight.to_gptq` reports by how much).

GPTQ checkpoints (AutoGPTQ / GPTQModel, ``desc_act=False``): ``qweight`` int32 ``[in / 8, out]``
(input rows 8k..8k+7 of column o in word [k, o], row 8k+j at bits 4j), ``qzeros`` int32
``[in / G, out / 8]`` (output columns packed the same way), ``scales`` ``[in / G, out]``, ``g_idx``
``[in]`` (``i // G`` without act-order). Format "gptq" (v1) stores each zero minus one, "gptq_v2"
the zero itself; both are read exactly, since integer zeros are exact floats.
"""

from __future__ import annotations

import torch

from ..nf4 import native
from ..stamp import stamp

GROUP_SIZES = (32, 64, 128)
FORMATS = ("gptq", "gptq_v2")
HALF_MIN_NORMAL, HALF_MAX = 2.0 ** -14, 65504.0


def _check_float(name: str, t, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _check_group(in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """``q`` [out, in] of values 0..15 (in even) -> uint8 [out, in / 2], column 2j in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] -> int64 [out, in] of values 0..15."""
    hi, lo = (codes >> 4).long(), (codes & 0xF).long()
    return torch.stack((hi, lo), dim=-1).reshape(codes.shape[0], -1)


class INT4Weight:
    """A frozen ``[out, in]`` weight as 4-bit codes with a float scale and zero point per
    ``(output row, group of group_size input columns)``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 shape: tuple[int, int]):
        out_features, in_features = (int(v) for v in shape)
        _check_group(in_features, group_size)
        if in_features % 2:
            raise ValueError(f"in_features must be even (two codes a byte), got {in_features}")
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            raise TypeError(f"codes: expected a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
        if tuple(codes.shape) != (out_features, in_features // 2):
            raise ValueError(f"codes: expected shape {[out_features, in_features // 2]}, got {list(codes.shape)}")
        groups = (out_features, in_features // group_size)
        _check_float("scales", scales, groups)
        _check_float("zeros", zeros, groups)
        if not (codes.device == scales.device == zeros.device):
            raise ValueError(f"codes, scales and zeros must be on one device, got {codes.device}, {scales.device}, "
                             f"{zeros.device}")
        if not bool(torch.isfinite(scales).all()) or bool((scales == 0).any()):
            raise ValueError("scales: every scale must be finite and nonzero (a zero scale makes the group's "
                             "zero point, and any merge into it, undefined)")
        if not bool(torch.isfinite(zeros).all()):
            raise ValueError("zeros: every zero point must be finite")
        self.codes = codes.contiguous()
        self.scales = scales.float().contiguous()
        self.zeros = zeros.float().contiguous()
        self.group_size = int(group_size)
        self.shape = torch.Size((out_features, in_features))
        self._native = self._native_key = None
        native.back_with_huge_pages(self.codes)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def native_view(self) -> _NativeView:
        """What the native NF4 kernels read to compute ``x (scale * q)^T``: these codes, the scales
        as block scales (a group is a block: its G weights are contiguous in the row), the table
        0..15 in place of NF4's values, and ``-scale * zero`` as each block's shift: the kernels
        build a block's table as ``k * scale + shift``, one fma an entry."""
        tensors = (self.codes, self.scales, self.zeros)
        key = stamp(*tensors)
        cached = self._native_key
        # Rebuilt after an in-place edit (the version counter) or for a new tensor (identity), and
        # on every call for tensors without a version counter (made under inference_mode).
        if key is None or cached is None or cached[1] != key or any(a is not b for a, b in zip(cached[0], tensors)):
            self._native = _NativeView(self)
            self._native_key = None if key is None else (tensors, key)
        return self._native

    def to(self, device) -> INT4Weight:
        """The same weight on ``device`` (codes, scales and zeros; never a dtype cast)."""
        return INT4Weight(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.group_size,
                          tuple(self.shape))

    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes, float32 scales and zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    def kernel_nbytes(self) -> int:
        """Bytes the native kernels read in one pass over W: the codes and the block parameters of
        :meth:`native_view` (6 a group on the CPU with half scales, else 8)."""
        params = self.native_view()._params
        return self.codes.numel() + params.numel() * params.element_size()

    STATE_KEYS = ("codes", "scales", "zeros")

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``prefix + "codes"``, ``"scales"`` and ``"zeros"`` (the float zero points, so a merged
        weight saves exactly); the shape and group size follow from their shapes."""
        return {prefix + k: getattr(self, k) for k in self.STATE_KEYS}

    @classmethod
    def from_state_dict(cls, state: dict, prefix: str = "") -> INT4Weight:
        """Inverse of :meth:`state_dict`, every tensor checked (a KeyError names a missing key)."""
        missing = [prefix + k for k in cls.STATE_KEYS if prefix + k not in state]
        if missing:
            raise KeyError(f"state_dict: missing INT4 keys {missing}")
        codes, scales, zeros = (state[prefix + k] for k in cls.STATE_KEYS)
        for k, t in zip(cls.STATE_KEYS, (codes, scales, zeros)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"state_dict: {prefix}{k}: expected a 2-D tensor, got "
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        out_features, in_features = codes.shape[0], 2 * codes.shape[1]
        if scales.shape[1] == 0 or in_features % scales.shape[1]:
            raise ValueError(f"state_dict: {prefix}scales: {list(scales.shape)} does not divide the "
                             f"{in_features} columns of {prefix}codes {list(codes.shape)} into groups")
        return cls(codes, scales, zeros, in_features // scales.shape[1], (out_features, in_features))

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 64, symmetric: bool = False) -> INT4Weight:
        """Round-to-nearest INT4 of ``weight [out, in]`` per group: asymmetric (``scale = (max - min)
        / 15``, ``zero = -min / scale``, a float) or symmetric (``zero = 8``, ``scale = absmax / 7``).
        Each scale that a normal half can hold is rounded to half first (GPTQ's scale dtype; the
        CPU kernels then read 6 bytes of parameters a group, not 8), the zero from the rounded one."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight: expected a 2-D floating-point tensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        out_features, in_features = weight.shape
        _check_group(in_features, group_size)
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("weight: every value must be finite (a NaN or inf has no INT4 code)")
        w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        if symmetric:
            scale = w.abs().amax(-1) / 7.0
        else:
            lo, hi = w.amin(-1).clamp(max=0.0), w.amax(-1).clamp(min=0.0)
            scale = (hi - lo) / 15.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group: q = zero
        # Scales in a normal half's range are rounded to half (as GPTQ stores them; 2^-11 of the
        # scale, ~1/1000 of a quantization step): the CPU kernels then read 6 bytes of parameters a
        # group instead of 8 (see _NativeView). The zero point is computed with the rounded scale.
        scale = torch.where(_half_normal(scale), scale.half().float(), scale)
        zero = torch.full_like(scale, 8.0) if symmetric else -lo / scale
        q = torch.clamp(torch.round(w / scale[..., None] + zero[..., None]), 0, 15)
        return cls(pack_codes(q.reshape(out_features, in_features)), scale, zero, group_size,
                   (out_features, in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W ``[out, in]``, computed in fp32 (float64 for a float64 dtype), returned in ``dtype``."""
        return self.dequantize_rows(0, self.shape[0], dtype)

    def dequantize_rows(self, start: int, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``start .. start + count`` of W, ``[count, in]`` (see :meth:`dequantize`)."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        rows = slice(start, start + count)
        q = unpack_codes(self.codes[rows]).to(work).reshape(count, -1, self.group_size)
        w = (q - self.zeros[rows].to(work)[..., None]) * self.scales[rows].to(work)[..., None]
        return w.reshape(count, self.shape[1]).to(dtype)

    def merged(self, delta: torch.Tensor) -> INT4Weight:
        """This weight plus a per-group constant ``delta [out, in / G]`` (added to every column of
        its group), folded into the zero points in fp32: ``zero' = zero - delta / scale``."""
        _check_float("delta", delta, tuple(self.scales.shape))
        zeros = self.zeros - delta.to(self.zeros.device, torch.float32) / self.scales
        return INT4Weight(self.codes, self.scales, zeros, self.group_size, tuple(self.shape))

    # -- GPTQ ---------------------------------------------------------------------------------------

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None, *, group_size: int, checkpoint_format: str = "gptq",
                  bits: int = 4) -> INT4Weight:
        """A 4-bit GPTQ layer's tensors (see the module docstring), read exactly."""
        if bits != 4:
            raise ValueError(f"bits: only 4-bit GPTQ checkpoints are read, got bits={bits}")
        if checkpoint_format not in FORMATS:
            raise ValueError(f"checkpoint_format: expected one of {FORMATS}, got {checkpoint_format!r}")
        for name, t in (("qweight", qweight), ("qzeros", qzeros)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 2:
                raise TypeError(f"{name}: expected a 2-D int32 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
        in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
        _check_group(in_features, group_size)
        groups = in_features // group_size
        if tuple(qzeros.shape) != (groups, out_features // 8) or out_features % 8:
            raise ValueError(f"qzeros: expected shape {[groups, out_features // 8]} for qweight "
                             f"{list(qweight.shape)} and group_size {group_size}, got {list(qzeros.shape)}")
        _check_float("scales", scales, (groups, out_features))
        if g_idx is not None:
            expected = torch.arange(in_features, device=g_idx.device) // group_size
            if tuple(g_idx.shape) != (in_features,):
                raise ValueError(f"g_idx: expected shape [{in_features}], got {list(g_idx.shape)}")
            if not torch.equal(g_idx.long(), expected):
                raise NotImplementedError("g_idx is not i // group_size: act-order (desc_act=True) checkpoints "
                                          "are not supported")
        shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
        q = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF        # [in / 8, 8, out]
        q = q.reshape(in_features, out_features).t()                   # [out, in]
        z = (qzeros[:, :, None] >> shifts[None, None, :]) & 0xF         # [groups, out / 8, 8]
        z = z.reshape(groups, out_features).t().float()                 # [out, groups]
        if checkpoint_format == "gptq":
            z = z + 1.0  # v1 checkpoints store zero - 1
        return cls(pack_codes(q), scales.t().float(), z, group_size, (out_features, in_features))

    def to_gptq(self, checkpoint_format: str = "gptq") -> tuple[dict, float]:
        """The GPTQ tensors (``qweight``, ``qzeros``, ``scales`` fp16, ``g_idx``) of this weight, and
        the relative error (Frobenius norm) that rounding its float zeros to GPTQ's integers, and
        its scales to fp16, adds to W."""
        if checkpoint_format not in FORMATS:
            raise ValueError(f"checkpoint_format: expected one of {FORMATS}, got {checkpoint_format!r}")
        out_features, in_features = self.shape
        if out_features % 8:
            raise ValueError(f"GPTQ packs 8 output columns a word: out_features {out_features} is not a multiple of 8")
        zeros = torch.clamp(torch.round(self.zeros), 0 if checkpoint_format == "gptq_v2" else 1, 15)
        stored = (zeros - (1.0 if checkpoint_format == "gptq" else 0.0)).to(torch.int64)
        q = unpack_codes(self.codes)                                             # [out, in]
        shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
        words = (q.t().reshape(in_features // 8, 8, out_features) << shifts[None, :, None]).sum(1)
        zwords = (stored.t().reshape(-1, out_features // 8, 8) << shifts[None, None, :]).sum(-1)
        scales16 = self.scales.half()
        tensors = {"qweight": _as_int32(words), "qzeros": _as_int32(zwords), "scales": scales16.t().contiguous(),
                   "g_idx": torch.arange(in_features, dtype=torch.int32, device=q.device) // self.group_size}
        exported = INT4Weight(self.codes, scales16.float(), zeros, self.group_size, tuple(self.shape))
        exact = self.dequantize(torch.float64)
        error = float((exported.dequantize(torch.float64) - exact).norm() / exact.norm().clamp(min=1e-300))
        return tensors, error

    # -- HQQ ----------------------------------------------------------------------------------------

    def to_hqq(self, compute_dtype: torch.dtype = torch.float16,
               bias: torch.Tensor | None = None) -> tuple[dict, float]:
        """This weight as the state dict ``hqq.core.quantize.HQQLinear.load_state_dict`` reads (4 bits,
        ``axis=1``, groups of ``group_size`` along a row, packing "4bit_u8"), and the relative error
        (Frobenius norm) of HQQ's dequantize in ``compute_dtype`` against this weight's own float32
        one. HQQ keeps float zero points, so in float32 the export is exact (a merged QA-LoRA weight
        included: error 0, the same bits); in 16 bits its scales, zeros and products round to that
        dtype.

        HQQ's layout: W reshaped to ``[out * in / G, G]`` (one group a row), codes packed along
        that first axis (row i in the high nibble of byte row i, row i + half in the low one),
        ``scale`` and ``zero`` ``[out * in / G, 1]``, and ``W = (q - zero) * scale``."""
        if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"compute_dtype: expected float16, bfloat16 or float32, got {compute_dtype}")
        out_features, in_features = self.shape
        groups = out_features * in_features // self.group_size
        if groups % 2:
            raise ValueError(f"HQQ packs two groups a byte row: {groups} groups (out_features x in_features / "
                             f"group_size) is odd")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
            raise ValueError(f"bias: expected a tensor of shape [{out_features}], got "
                             f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        q = unpack_codes(self.codes).to(torch.uint8).reshape(groups, self.group_size)
        half = groups // 2
        state = {
            "W_q": (q[:half] << 4) | q[half:], "nbits": 4, "group_size": self.group_size,
            "shape": torch.Size((out_features, in_features)), "axis": 1, "packing": "4bit_u8",
            "unpack_view_dtype": torch.uint8, "view_as_float": False, "compute_dtype": compute_dtype,
            "scale": self.scales.reshape(groups, 1).to(compute_dtype),
            "zero": self.zeros.reshape(groups, 1).to(compute_dtype), "quant_scale": False, "quant_zero": False,
            "offload_meta": False,
        }
        if bias is not None:
            state["bias"] = bias.detach().to(compute_dtype)
        hqq = ((q.to(compute_dtype) - state["zero"]) * state["scale"]).reshape(out_features, in_features)
        own = self.dequantize(torch.float32).double()
        return state, float((hqq.double() - own).norm() / own.norm().clamp(min=1e-300))


def _half_normal(scales: torch.Tensor) -> torch.Tensor:
    """Where a scale lies in a normal IEEE half's range (quantize rounds those to half)."""
    a = scales.abs()
    return (a >= HALF_MIN_NORMAL) & (a <= HALF_MAX)


def half_exact(scales: torch.Tensor) -> bool:
    """Whether every scale is a normal IEEE half (what the compact native layout holds exactly)."""
    return bool((_half_normal(scales) & (scales.half().float() == scales)).all())


class _NativeView:
    """An INT4 weight in the NF4 kernels' terms (see :meth:`INT4Weight.native_view`).

    One stream of block parameters. On the CPU, where every scale is a normal half (GPTQ's fp16
    scales, :meth:`INT4Weight.quantize`'s): 6 bytes a block, the shift in float32 and the scale as
    a half (``half_params``; 4096 x 4096 at G = 64: 9.96 MB read at M = 1 against 10.5 MB with
    float32 pairs and NF4's 9.44 MB). Elsewhere (CUDA, other scales): float32 (scale, shift)
    pairs. The shift ``-scale * zero`` is float32 either way, so a merged weight decodes exactly."""

    __slots__ = ("packed", "absmax", "nested_absmax", "nested_code", "offset", "blocksize", "shape", "numel",
                 "native_code", "native_shift", "native_scale_stride", "native_half_params", "_params")

    def __init__(self, w: INT4Weight, compact: bool | None = None):
        """``compact``: None chooses as above; False forces the float32 pairs (tests compare the two)."""
        shift = -(w.scales * w.zeros)
        self.native_half_params = None
        if compact is None:
            compact = w.device.type == "cpu" and half_exact(w.scales)
        elif compact and not half_exact(w.scales):
            raise ValueError("compact: the scales are not all normal halfs")
        if compact:
            rec = torch.cat((shift.reshape(-1, 1).view(torch.uint8), w.scales.half().reshape(-1, 1).view(torch.uint8)),
                            dim=1)
            self._params = self.native_half_params = rec.reshape(-1).contiguous()
            self.absmax = self.native_shift = self._params  # the kernels read half_params in their place
            self.native_scale_stride = 1
        else:
            self._params = torch.stack((w.scales, shift), dim=-1).reshape(-1, 2).contiguous()
            self.absmax, self.native_shift, self.native_scale_stride = self._params[:, 0], self._params[:, 1], 2
        self.packed, self.blocksize = w.codes, w.group_size
        self.nested_absmax = self.nested_code = self.offset = None
        self.shape, self.numel = w.shape, w.shape.numel()
        self.native_code = torch.arange(16, dtype=torch.float32, device=w.device)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits -> int32 with the same bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
