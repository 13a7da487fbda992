"""Pure-torch NF4: quantize, dequantize and matmul, bit-exact with bitsandbytes' CPU path.

The format (QLoRA, Dettmers et al. 2023, as bitsandbytes stores it):
    * W is flattened row-major and cut into blocks of ``blocksize`` elements (blocks run over the
      flattened tensor, so with ``in_features % blocksize != 0`` a block straddles two rows);
    * ``absmax[b] = max |w|`` over block b (float32), the last block may be short;
    * each element becomes the index of the nearest of the 16 NF4 code values to ``w / absmax[b]``;
    * two indices per byte, the even (first) element in the high nibble.
    * Double quantization stores ``absmax - mean(absmax)`` itself 8-bit blockwise (blocksize 256)
      against bitsandbytes' signed "dynamic" code, with a float32 absmax per 256 blocks.

Every arithmetic step below is written in the order bitsandbytes performs it (``x * (1/absmax)``
for full blocks but ``x / absmax`` for the short tail, float32 midpoints, ties to the lower code),
because a one-ulp difference flips a nibble.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The 16 NF4 values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (QLoRA, App. E).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256  # double quantization: one float32 scale per 256 absmax values
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (256 sorted float32 values in [-0.993, 1]).

    Dettmers' dynamic tree: for exponent e = 0..6 the decade ``10^(e-6)`` holds ``2^e`` linearly
    spaced bucket centres on [0.1, 1] (both signs), plus 0 and 1. Computed in float32 exactly
    as bitsandbytes computes it, so the table is identical bit for bit.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (e - 6)
        values += (decade * centres).tolist() + (-decade * centres).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _blocks(flat: torch.Tensor, blocksize: int):
    """Split a flat float32 tensor into ``[full, blocksize]`` and a short tail."""
    full = flat.numel() // blocksize * blocksize
    return flat[:full].view(-1, blocksize), flat[full:]


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (any shape, fp16/bf16/fp32) -> ``(packed uint8 [ceil(n/2)], absmax float32 [ceil(n/bs)])``."""
    flat = weight.reshape(-1).float()
    body, tail = _blocks(flat, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if tail.numel():
        tail_max = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, (tail / tail_max).clamp(-1, 1)])
    code = nf4_code(flat.device)
    midpoints = (code[:-1] + code[1:]) / 2
    index = torch.bucketize(scaled, midpoints).to(torch.uint8)  # a value on a midpoint takes the lower code
    if index.numel() % 2:  # bitsandbytes pads the scaled values with 0.0, whose code index is 7
        index = torch.cat([index, index.new_full((1,), 7)])
    packed = (index[0::2] << 4) | index[1::2]
    return packed, absmax


def unpack_nf4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """``packed uint8 [ceil(n/2)]`` -> code indices ``int64 [n]`` (high nibble first)."""
    index = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return index[:numel].long()


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4`: ``code[index] * absmax[block]`` in float32, then cast to ``dtype``."""
    numel = 1
    for s in shape:
        numel *= s
    values = nf4_code(packed.device)[unpack_nf4(packed.reshape(-1), numel)]
    scale = absmax.float().repeat_interleave(blocksize)[:numel]
    return (values * scale).to(dtype).reshape(shape)


def _lut_index(scaled: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer maps ``v`` in [-1, 1] to one of 65536 grid points,
    ``trunc((v + 1) * 0.5 * 65535 + 0.5)``, in float32."""
    return ((scaled.clamp(-1, 1) + 1.0) * 0.5 * 65535.0 + 0.5).long()


def _grid_to_code(code: torch.Tensor) -> torch.Tensor:
    """For each of the 65536 grid points ``-1 + 2i/65535`` the index of the nearest code value
    (ties to the lower one): the table bitsandbytes' CPU quantizer looks up."""
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=code.device)) / 65535.0
    return torch.searchsorted(midpoints, grid, side="left")


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """float32 ``values [n]`` -> ``(uint8 [n], absmax float32 [ceil(n/bs)])``: the absmax quantizer of
    double quantization, as bitsandbytes' CPU backend computes it."""
    flat = values.reshape(-1).float()
    body, tail = _blocks(flat, blocksize)
    parts = [body] + ([tail.unsqueeze(0)] if tail.numel() else [])
    table = _grid_to_code(code)
    q, absmax = [], []
    for part in parts:
        amax = part.abs().amax(dim=1)
        zero = (amax == 0).unsqueeze(1)  # an all-zero block: index 0, as bitsandbytes writes it
        inv = 1.0 / torch.where(amax == 0, torch.ones_like(amax), amax)
        idx = torch.where(zero, 0, table[_lut_index(part * inv.unsqueeze(1))])
        q.append(idx.reshape(-1).to(torch.uint8))
        absmax.append(amax)
    return torch.cat(q), torch.cat(absmax)


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """``code[q] * absmax[block]`` in float32."""
    scale = absmax.float().repeat_interleave(blocksize)[: q.numel()]
    return code.float()[q.reshape(-1).long()] * scale


def nested_absmax_values(q, nested_absmax, nested_code, offset) -> torch.Tensor:
    """Double-quantized absmax -> float32 absmax: ``code2[q] * absmax2[i // 256] + offset``
    (multiply, round, add, round: two float32 roundings, no fused multiply-add)."""
    return dequantize_blockwise_8bit(q, nested_absmax, nested_code) + offset.float()


def nf4_matmul_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                         shape: Sequence[int], transpose: bool = False) -> torch.Tensor:
    """``x [M, in] @ W^T -> [M, out]`` (or, with ``transpose``, ``dy [M, out] @ W -> [M, in]``) for
    W ``shape = [out, in]`` given by its ``packed`` codes and float32 ``absmax``, dequantized to
    ``x.dtype`` first, as bitsandbytes' ``matmul_4bit`` does."""
    w = dequantize_nf4(packed, absmax, blocksize, shape, x.dtype)
    return x @ w if transpose else x @ w.t()
