"""Base weights: the frozen ``W [out, in]`` of a LoRA layer, dense or quantized, behind one interface.

The LoRA bodies (:func:`lorakern.ops.lora.forward_body`, :func:`~lorakern.ops.lora.backward_body`)
are written once against it, so a new base kind (a group-wise INT4 base, say) is one class here:

    shape                          (out, in)
    nbytes                         bytes W occupies: what a memory-bound pass over it must read
    dequantize(dtype, backend)     W [out, in] in dtype (dense: W itself when the dtype matches)
    dequantize_rows(start, out)    rows start .. start + out.shape[0] of W into out [n, in]
    matmul(x, transpose, backend)  x [M, in] W^T -> [M, out], or with transpose dy [M, out] W -> [M, in]
    linear(x, bias, backend, dtype)  x W^T + bias, computed in dtype (default x's), in x's dtype
    grad_input(dy, backend, dtype)   dy W, computed in dtype (default dy's), in dy's dtype
    fused_forward(...)             the whole LoRA forward in one call where the base has one, else None
    tensors()                      the tensors holding W (what a cache of values derived from W keys on)
    row_norms()                    ||W_j|| [out] in fp32 (fp64 for a float64 W: DoRA's weight norm)
    shared_rows                    rows of x up to which one matmul costs about what one row does

``backend`` is the resolved name ("reference", "native", "triton"); a base serves "triton" with
what the Triton kernels read (a dense W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import FLOAT_DTYPES, SMALL_M
from ..nf4 import native
from ..nf4.reference import nf4_matmul_reference

TILE_ELEMENTS = 1 << 22  # 4M weights per dequantized tile: 16 MB in fp32, 8 MB in bf16


def tile_rows(n_rows: int, cols: int) -> int:
    """Rows of W per dequantized tile (at most TILE_ELEMENTS weights, at least one row)."""
    return max(1, min(n_rows, TILE_ELEMENTS // max(cols, 1)))


def row_tiles(n_rows: int, cols: int):
    """``(first row, rows)`` of each tile, in order."""
    per = tile_rows(n_rows, cols)
    for r0 in range(0, n_rows, per):
        yield r0, min(per, n_rows - r0)


def tiled_matmul(x: Tensor, transpose: bool, shape, decode) -> Tensor:
    """``x W^T`` (or with ``transpose`` ``x W``) with W decoded a row tile at a time by
    ``decode(r0, n) -> W[r0:r0+n]``, one BLAS matmul per tile: never a whole dense W."""
    n_rows, cols = shape
    y = x.new_zeros(x.shape[0], cols) if transpose else x.new_empty(x.shape[0], n_rows)
    for r0, n in row_tiles(n_rows, cols):
        tile = decode(r0, n)
        if transpose:  # dx [M, in] += dy[:, r0:r0+n] @ W[r0:r0+n]
            y.addmm_(x[:, r0:r0 + n], tile)
        else:  # y[:, r0:r0+n] = x @ W[r0:r0+n]^T
            y[:, r0:r0 + n] = x @ tile.t()
    return y


class DenseBase:
    """A dense ``weight [out, in]`` (any strides)."""

    __slots__ = ("weight", "shape")
    # A dense matmul at M <= 64 is bound by reading W (4096 x 4096 fp32 on 2 Zen 4 cores: 8.7 ms
    # at M = 16, 10.6 ms at M = 32, 3.2 ms at M = 1 with the BLAS's M = 1 path).
    shared_rows = 64

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.shape = weight.shape

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.weight,)

    def row_norms(self) -> Tensor:
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return torch.linalg.vector_norm(self.weight, dim=1, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dequantize(self, dtype: torch.dtype, backend: str = "reference") -> Tensor:
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def dequantize_rows(self, start: int, out: Tensor) -> Tensor:
        return out.copy_(self.weight[start:start + out.shape[0]])

    def matmul(self, x: Tensor, transpose: bool, backend: str = "reference") -> Tensor:
        return x @ self.weight if transpose else x @ self.weight.t()

    def linear(self, x: Tensor, bias: Tensor | None, backend: str = "reference", dtype=None) -> Tensor:
        return F.linear(x, self.weight, bias)  # one dtype: the dense op's inputs share x's

    def grad_input(self, dy: Tensor, backend: str = "reference", dtype=None) -> Tensor:
        return dy @ self.weight

    def fused_forward(self, x, bias, adapter, backend):
        return None


_fast_half: dict = {}  # dtype -> bool, fixed for the process (the CPU); a plain dict so torch.compile traces it


def cpu_half_matmul_is_fast(dtype: torch.dtype) -> bool:
    """Whether torch's CPU matmul in ``dtype`` (bfloat16 / float16) runs on the CPU's own
    half-precision dot products: AVX512-BF16 or AMX for bfloat16, AMX-FP16 for float16. Elsewhere
    a product in a half dtype costs more than in float32, so the NF4 / INT4 bases compute in
    float32 and round the result once. 4096 x 4096, 2 threads, Zen 4, cold, x W^T: float16 tiles
    (torch's fp16 GEMM) 5x to 7x the native float32 kernel's time at M = 17, 64, 256; bfloat16
    tiles 0.5x it (AVX512-BF16 present), 1.7x to 4x with oneDNN held to AVX2
    (ONEDNN_MAX_CPU_ISA=AVX2, as on an AVX2-only CPU); the float32 result is also closer to the
    float64 one (bf16 relative error 1.7e-3 against 2.3e-3)."""
    if dtype not in _fast_half:
        def flag(name):
            return bool(getattr(torch.cpu, name, lambda: False)())

        _fast_half[dtype] = (flag("_is_avx512_bf16_supported") or flag("_is_amx_tile_supported")
                             if dtype == torch.bfloat16 else flag("_is_amx_fp16_supported"))
    return _fast_half[dtype]


def computes_in_float32(x: Tensor) -> bool:
    """A half-precision x on the CPU whose product the bases compute in float32
    (:func:`cpu_half_matmul_is_fast`)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
            and not cpu_half_matmul_is_fast(x.dtype))


def cpu_call_takes(x: Tensor, rows: int, *tensors: Tensor | None, contiguous: bool = True) -> bool:
    """Whether the one-call CPU QLoRA kernel (:meth:`NF4Base.fused_forward`) takes x with ``rows``
    rows and ``tensors`` (bias, A, B; None skipped): x on the CPU, all of x's dtype (float32, or
    bfloat16 / float16, which the call computes in float32, rounding y and h once) and contiguous
    (unless ``contiguous`` is False: a caller that copies strided ones), with 1 to SMALL_M rows or
    more where the native kernel serves the base (:func:`cpu_matmul_serves`). lorakern/nf4/plan.py
    keeps calls it took.

    Above SMALL_M rows too, because a torch op between two native calls costs the next one a core:
    torch's OpenMP workers spin for a few ms after each parallel op (libgomp's default wait
    policy), on the cores the native kernel's threads want. 4096 -> 1024, M = 256, 2 threads,
    AVX2 (Zen 4), layers rotating past the L3, interleaved: base by the kernel then the LoRA term
    in torch 16.5 ms, everything in the kernel 12.5 ms, fp32 ``nn.Linear`` 11.9 ms; at M = 64
    7.3 / 3.7 / 4.3 ms. Half precision the same way: a bfloat16 / float16 layer (4096 x 4096,
    r = 16, 2 threads, Zen 4, cold) took 1.5x to 2x the float32 layer's time at M = 1 to 16 with
    the base in the kernel and the LoRA term and the conversions in torch."""
    return cpu_call_rows(x, rows) and all(t is None or (t.dtype == x.dtype and (t.is_contiguous() or not contiguous))
                                          for t in (x, *tensors))


def cpu_call_rows(x: Tensor, rows: int) -> bool:
    """x (any layout) on the CPU in a float dtype, with ``rows`` rows the one-call kernel takes: 1
    to SMALL_M, or more where the native kernel serves the base (:func:`cpu_matmul_serves`)."""
    return (x.device.type == "cpu" and rows > 0 and x.dtype in FLOAT_DTYPES
            and (rows <= SMALL_M or cpu_matmul_serves(x, False)))


def cpu_matmul_serves(x: Tensor, transpose: bool, in_features: int | None = None) -> bool:
    """Whether the native CPU kernel takes ``x W^T`` (or, with ``transpose``, ``x W``: x is dY [M,
    out], ``in_features`` W's columns) above SMALL_M rows: float32 x on the CPU (or bfloat16 /
    float16 x where :func:`computes_in_float32`: converted inside the call). Its 16-row micro-tiles
    run the FMAs near the CPU's peak with each slice of W decoded once per 16 to 256 rows;
    dequantizing W into tiles for torch's GEMM costs a write and a read of 4 bytes a weight.
    ``nf4_matmul`` at 4096 x 4096, 2 threads, Zen 4 (AVX-512), cold weights, interleaved, native /
    tiled time: M = 17 0.33x, 32 0.36x, 64 0.23x, 256 0.68x, 1024 0.77x; M = 256 4096 -> 1024 0.89x,
    4096 -> 14336 0.78x, 14336 -> 4096 0.73x; the AVX2 path at 4096 x 4096, M = 256 0.90x. ``x W``
    (the backward's dx; register tiles of 8 rows of dY, 3 on AVX2, over each decoded 32-column
    step): 4096 x 4096, M = 17 0.33x, 64 0.52x, 256 0.78x, 512 0.78x, 1024 0.89x, 2048 0.96x (AVX2
    0.80x at 256, 0.95x-0.98x at 1024 and 2048); 14336 x 4096 and 4096 x 14336 at M = 17 0.12x /
    0.21x, 256 0.60x / 0.74x, 512 0.78x / 0.77x; from 64 rows the time of ``x W^T`` of the same size
    (within 3%). bfloat16 / float16 x where torch's half-precision GEMM is faster keep the tiled
    path, as do in_features not a multiple of 32 (the kernel's element-wise path, a dot product per
    output: 3.0x the tiled time at 4096 x 4100, M = 64) and CPUs without AVX2 (the plain C++ build,
    vectorized by the compiler for the CPU's baseline: 1.5x the tiled time at M = 256 with SSE2
    beside the BLAS's AVX-512)."""
    k = x.shape[-1] if not transpose else in_features
    return (x.device.type == "cpu" and (x.dtype == torch.float32 or computes_in_float32(x))
            and k is not None and k % 32 == 0 and native.unavailable_reason(x.device) is None
            and native.cpu_isa() != "scalar")


class NF4Base:
    """An NF4 weight (:class:`lorakern.NF4Weight`, already validated), read by the native kernels
    (``lorakern._C``) or decoded by the reference.

    Matmul strategy (M rows of x):
        M <= SMALL_M: fused dequant-matmul reading the 4-bit bytes directly (memory-bound: ~4.5 bits
            per weight read instead of 16 or 32);
        M >  SMALL_M: compute-bound. x W^T in float32 on the CPU: the same native kernel, whose
            16-row micro-tiles share each decoded slice of W (:func:`cpu_matmul_serves`), and x W
            the same way; elsewhere row tiles of W dequantized into one reused buffer and
            torch's matmul (cuBLAS / the CPU BLAS) does the FLOPs.
    """

    __slots__ = ("w", "shape")
    # Past SMALL_M rows the native kernel's cost grows with M (4096 x 4096, 2 Zen 4 cores, cold:
    # ~0.65 ms at M = 1, ~3.5 ms at M = 16, ~3.6 ms at 17, ~6 ms at 32, ~12 ms at M = 64).
    shared_rows = SMALL_M

    def __init__(self, w):
        self.w = w
        self.shape = w.shape

    def tensors(self) -> tuple[Tensor, ...]:
        w = self.w
        return tuple(t for t in (w.packed, w.absmax, w.nested_absmax, w.nested_code, w.offset) if t is not None)

    def row_norms(self) -> Tensor:
        """Decoded tile by tile (never the whole W at once on the CPU), summed in fp32."""
        n_rows, cols = self.shape
        if self.w.device.type != "cpu" or native.unavailable_reason(self.w.device) is not None:
            return self.row_norms_of(self.dequantize(torch.float32))
        buf = torch.empty(tile_rows(n_rows, cols) * cols, dtype=torch.float32)
        out = torch.empty(n_rows, dtype=torch.float32)
        for r0, n in row_tiles(n_rows, cols):
            out[r0:r0 + n] = self.row_norms_of(self.dequantize_rows(r0, buf[: n * cols].view(n, cols)))
        return out

    @staticmethod
    def row_norms_of(w: Tensor) -> Tensor:
        return torch.linalg.vector_norm(w, dim=1, dtype=torch.float32)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes()

    def dequantize(self, dtype: torch.dtype, backend: str = "native") -> Tensor:
        """The native dequantize unless the reference was asked for or the extension is not built
        for the device (both give the same bits)."""
        if backend != "reference" and native.unavailable_reason(self.w.device) is None:
            return native.dequantize_into(self.w, torch.empty(tuple(self.shape), dtype=dtype, device=self.w.device))
        return self.w.dequantize_reference(dtype)

    def dequantize_rows(self, start: int, out: Tensor) -> Tensor:
        """``out [n, in]`` (contiguous) = rows ``start .. start + n`` of W (native, CPU)."""
        return native.dequantize_into(self.w, out, start=start * self.shape[1])

    def matmul(self, x: Tensor, transpose: bool, backend: str = "native") -> Tensor:
        """``x`` 2-D in fp16 / bf16 / fp32; a new tensor (callers add into it in place)."""
        out_features, in_features = self.shape
        if backend != "native":
            return nf4_matmul_reference(x, self.w.packed, self.w.absmax_float(), self.w.blocksize, self.shape,
                                        transpose).contiguous()
        M = x.shape[0]
        if M == 0:
            return x.new_empty(0, in_features if transpose else out_features)
        if M <= SMALL_M or cpu_matmul_serves(x, transpose, in_features):
            if x.device.type == "cpu":  # (a half x is computed in float32 inside the call)
                return native.cpu_matmul(x, self.w, transpose)
            if not transpose:
                return native.cuda_gemv(x, self.w)
        if computes_in_float32(x):  # x W above SMALL_M rows: float32 tiles
            return self.matmul(x.float(), transpose, backend).to(x.dtype)
        return self._tiled_matmul(x.contiguous(), transpose)

    def _tiled_matmul(self, x: Tensor, transpose: bool) -> Tensor:
        """Large M: dequantize ``rows_per_tile`` rows of W at a time into one buffer, matmul each tile."""
        n_rows, cols = self.shape
        if x.device.type == "cuda":  # the CUDA dequantize writes whole weights: one tile
            full = self.dequantize(x.dtype)
            return x @ full if transpose else x @ full.t()
        buf = torch.empty(tile_rows(n_rows, cols) * cols, dtype=x.dtype, device=x.device)
        return tiled_matmul(x, transpose, self.shape,
                            lambda r0, n: self.dequantize_rows(r0, buf[: n * cols].view(n, cols)))

    def linear(self, x: Tensor, bias: Tensor | None, backend: str = "native", dtype=None) -> Tensor:
        """``dtype`` other than x's (bitsandbytes' ``compute_dtype``): W decoded to it (rounded there)
        and one matmul in it, x and bias cast to it, as bitsandbytes computes; then cast to x's."""
        if dtype is not None and dtype != x.dtype:
            wd = self.dequantize(dtype, backend)
            return F.linear(x.to(dtype), wd, None if bias is None else bias.to(dtype)).to(x.dtype)
        y = self.matmul(x, False, backend)
        return y if bias is None else y.add_(bias)

    def grad_input(self, dy: Tensor, backend: str = "native", dtype=None) -> Tensor:
        if dtype is not None and dtype != dy.dtype:  # the base's grad in its own dtype, as bitsandbytes'
            return (dy.to(dtype) @ self.dequantize(dtype, backend)).to(dy.dtype)
        return self.matmul(dy, True, backend)

    def fused_forward(self, x, bias, adapter, backend):
        """On the CPU with float32 contiguous tensors and no dropout, at small M and wherever the
        native kernel takes the base above it (:func:`cpu_call_takes`), the native kernel does base,
        LoRA term and bias in one call. Elsewhere the LoRA term is two small torch
        matmuls, two transposes and an add after the base, each a dispatch on a 0.1-2 ms decode
        call; in the kernel it measured 0.343 ms against 0.329 ms for the base alone (M = 1,
        4096 x 4096)."""
        if backend != "native" or adapter.dropout_p != 0.0:
            return None
        if not cpu_call_takes(x, x.shape[0], bias, adapter.lora_A, adapter.lora_B, contiguous=False):
            return None
        # Strided tensors (x a view of a wider activation, a transposed adapter) are copied: the
        # same one call, so the same bits, as for contiguous ones (the other path rounds the base
        # and the term apart); a copy of x [M, in] beside a pass over W.
        x, bias, A, B = (None if t is None else t.contiguous() for t in (x, bias, adapter.lora_A, adapter.lora_B))
        return native.cpu_qlora_forward(x, self.w, bias, A, B, adapter.scaling)


class INT4Base:
    """A group-wise INT4 weight (:class:`lorakern.INT4Weight`). On the CPU at small M the native
    NF4 kernels read it (a block's table ``k * scale + shift``); otherwise row tiles of W are
    decoded (natively on the CPU, in torch elsewhere) into a buffer of at most ``TILE_ELEMENTS``
    and multiplied there, so a call never holds a whole dense W (4096 x 14336 in fp32 is 235 MB; a
    tile is 16 MB)."""

    __slots__ = ("w", "shape")
    shared_rows = 64

    def __init__(self, w):
        self.w = w
        self.shape = w.shape

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.w.codes, self.w.scales, self.w.zeros)

    @property
    def nbytes(self) -> int:
        return self.w.kernel_nbytes()

    def row_norms(self) -> Tensor:
        dtype = torch.float32
        return torch.cat([torch.linalg.vector_norm(self.w.dequantize_rows(r0, n, dtype), dim=1)
                          for r0, n in row_tiles(*self.shape)]) if self.shape[0] else torch.zeros(0)

    def dequantize(self, dtype: torch.dtype, backend: str = "reference") -> Tensor:
        """In torch (``backend="reference"``, or where the native kernels are not built), else the
        native dequantize, whose bits the CPU and CUDA kernels share (``k * scale``, then
        ``+ shift``, each rounded)."""
        if backend == "reference" or not self._native_decodes(dtype):
            return self.w.dequantize(dtype)
        return native.dequantize_into(self.w.native_view(),
                                      torch.empty(tuple(self.shape), dtype=dtype, device=self.w.device))

    def _native_decodes(self, dtype: torch.dtype) -> bool:
        return dtype in FLOAT_DTYPES and native.unavailable_reason(self.w.device) is None

    def dequantize_rows(self, start: int, out: Tensor) -> Tensor:
        return out.copy_(self.w.dequantize_rows(start, out.shape[0], out.dtype))

    def native_serves(self, x: Tensor, transpose: bool = False) -> bool:
        """The native NF4 kernels with the table 0..15 and each group's shift (``W = scale * q +
        shift``, ``shift = -scale * zero``), M <= SMALL_M, extension built, x in fp32 / bf16 / fp16:
        on the CPU both products (computed in float32 inside the call), on CUDA the GEMV (``x W^T``
        only)."""
        if not (0 < x.shape[0] <= SMALL_M and native.unavailable_reason(x.device) is None):
            return False
        if x.dtype not in FLOAT_DTYPES:
            return False
        return x.device.type == "cpu" or (x.device.type == "cuda" and not transpose)

    def matmul(self, x: Tensor, transpose: bool, backend: str = "auto") -> Tensor:
        """``backend``: "reference" (row tiles decoded in torch), "native" (raises where the
        native path does not serve), "auto" (native where it serves)."""
        if backend == "native" and not self.native_serves(x, transpose):
            raise RuntimeError("INT4 backend='native' serves 1 to 16 rows of float32 / bfloat16 / float16 x "
                               "with lorakern._C built: x W^T and x W on the CPU, x W^T on CUDA; got "
                               f"{x.dtype} on {x.device}, {x.shape[0]} rows{' (x W)' if transpose else ''}")
        if backend != "reference" and self.native_serves(x, transpose):
            return self._native_matmul(x, transpose)
        if backend != "reference" and x.shape[0] > 0 and computes_in_float32(x):
            return self.matmul(x.float(), transpose, backend).to(x.dtype)
        return self._tiled_matmul(x, transpose, backend)

    def _native_matmul(self, x: Tensor, transpose: bool) -> Tensor:
        # One native call, no torch op around it: on 2 cores a torch op between two native calls
        # cost the next one ~2 ms at M = 16 (the two thread pools' workers compete for the cores).
        if x.device.type == "cuda":
            return native.cuda_gemv(x, self.w.native_view())
        return native.cpu_matmul(x, self.w.native_view(), transpose)

    def _tiled_matmul(self, x: Tensor, transpose: bool, backend: str = "auto") -> Tensor:
        """Above SMALL_M rows (or x W): float32 x W^T on the CPU by the native kernel
        (:func:`cpu_matmul_serves`), other CPU products on row tiles decoded by the native
        dequantize (the matmul's table walk); on CUDA the whole W decoded once by the CUDA
        dequantize (it writes whole weights, as NF4's) and one cuBLAS matmul; else row tiles decoded
        in torch."""
        n_rows, cols = self.shape
        if x.device.type == "cuda" and backend != "reference" and self._native_decodes(x.dtype):
            full = self.dequantize(x.dtype, backend)
            return x @ full if transpose else x @ full.t()
        if not (x.device.type == "cpu" and self._native_decodes(x.dtype)):
            return tiled_matmul(x, transpose, self.shape, lambda r0, n: self.w.dequantize_rows(r0, n, x.dtype))
        if backend != "reference" and cpu_matmul_serves(x, transpose, cols):
            return self._native_matmul(x, transpose)
        view, buf = self.w.native_view(), torch.empty(tile_rows(n_rows, cols) * cols, dtype=x.dtype)
        return tiled_matmul(x, transpose, self.shape, lambda r0, n: native.dequantize_into(
            view, buf[: n * cols].view(n, cols), start=r0 * cols))

    def linear(self, x: Tensor, bias: Tensor | None, backend: str = "auto", dtype=None) -> Tensor:
        y = self.matmul(x, False, backend)
        return y if bias is None else y.add_(bias)

    def grad_input(self, dy: Tensor, backend: str = "auto", dtype=None) -> Tensor:
        return self.matmul(dy, True, backend)

    def fused_forward(self, x, bias, adapter, backend):
        return None
