"""The bridge to ``lorakern._C``: load it once, pick the CPU path, pass pointers.

Every function here takes tensors (and NF4 weights, read through their ``packed``, ``absmax``,
``nested_absmax``, ``nested_code``, ``offset``, ``blocksize`` and ``shape``) that the ops have
already validated (dtype, device, contiguity, sizes); the C++ side trusts them.
"""

from __future__ import annotations

import os
import struct
import weakref

import torch

# force "scalar", "avx2" (-vpshufb, -vpermps), "avx512" or "avx512-bf16" (tests cover each path)
ISA_ENV = "LORAKERN_CPU_ISA"
TEAM_ENV = "LORAKERN_CPU_TEAM"  # csrc/cpu/thread_pool.h
TEAMS = ("pool", "openmp", "auto")  # in the extension's order (cpu::Team)
DEFAULT_TEAM = "auto"
# The L2 size (bytes) that the tiles of 3 to 10 rows of x size their slices of x by: the speed, never
# the result. The extension reads it once, at its first such call (csrc/cpu/nf4_cpu_impl.h).
L2_ENV = "LORAKERN_CPU_L2_BYTES"
OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# "0": leave a CPU weight's 4-bit bytes on the pages they came on (see back_with_huge_pages)
HUGE_PAGES_ENV = "LORAKERN_HUGE_PAGES"


_loaded: list = []  # [(module or None, reason or None)] once tried; a plain list so torch.compile traces it


def _load():
    if not _loaded:
        try:
            from .. import _C

            _loaded.append((_C, None))
        except ImportError as exc:
            _loaded.append((None, f"lorakern._C is not built ({exc}); reinstall with a C++ compiler present "
                                  "(pip install -e .)"))
    return _loaded[0]


def extension():
    """The ``lorakern._C`` module, or None."""
    return _load()[0]


def unavailable_reason(device: torch.device) -> str | None:
    """Why the native kernels cannot serve tensors on ``device``; None when they can."""
    C, reason = _load()
    if C is None:
        return reason
    if device.type == "cuda" and not C.with_cuda:
        return ("lorakern._C was built without CUDA (nvcc was not found at install time); reinstall with "
                "CUDA_HOME pointing at a CUDA toolkit, or LORAKERN_CUDA=1 to make that an error")
    if device.type not in ("cpu", "cuda"):
        return f"no native NF4 kernels for device type {device.type!r}"
    return None


_isa_names: list = []  # the extension's CPU paths, fixed for the process (the CPU and the build)


def _isas() -> list[str]:
    if not _isa_names:
        _isa_names[:] = extension().available_isas()  # one assignment: callers on two threads agree
    return _isa_names


def cpu_isa() -> str:
    """The CPU path to use: ``$LORAKERN_CPU_ISA`` if set (must be available; "avx2" names this CPU's
    AVX2 lookup, ``avx2-vpshufb`` on AMD and ``avx2-vpermps`` elsewhere), else the widest one
    (``avx512-bf16``: ``avx512`` plus bfloat16 dot products, where the CPU has AVX512-BF16)."""
    have = _isas()
    forced = os.environ.get(ISA_ENV)
    if forced:
        avx2 = [name for name in have if name.startswith("avx2-")]
        name = avx2[-1] if forced == "avx2" and avx2 else forced
        if name not in have:
            offers = have + ["avx2"] if avx2 else have
            raise RuntimeError(f"{ISA_ENV}={forced!r}: this CPU/build offers {offers}")
        return name
    return have[-1]


_team_set: list = [None]  # what the extension was last told (use_team); a plain list so torch.compile traces it


def cpu_threads() -> int:
    """The thread count for a native CPU call (torch's), after checking ``$LORAKERN_CPU_L2_BYTES``
    and ``$LORAKERN_CPU_TEAM`` and passing the team on to the extension: which threads run a call's
    pieces beside the caller, ``pool`` (lorakern's own workers), ``openmp`` (torch's OpenMP team)
    or ``auto`` (the default: each loop on the OpenMP team while its threads are spinning after a
    torch op on cores of their own, on the pool otherwise)."""
    threads = torch.get_num_threads()
    l2 = os.environ.get(L2_ENV)
    if l2 and not (l2.isascii() and l2.isdigit() and int(l2) > 0):  # the extension would read "1M" as 1
        raise RuntimeError(f"{L2_ENV}={l2!r}: expected a whole number of bytes, e.g. 1048576 for 1 MiB")
    team = os.environ.get(TEAM_ENV) or DEFAULT_TEAM
    if team != _team_set[0]:
        if team not in TEAMS:
            raise RuntimeError(f"{TEAM_ENV}={team!r}: expected one of {list(TEAMS)}")
        extension().use_team(TEAMS.index(team))
        _team_set[0] = team
    if team == "openmp" and threads > 1 and not extension().openmp_team_available():
        raise RuntimeError(f"{TEAM_ENV}=openmp: torch's OpenMP runtime is not usable here: not found in this "
                           f"process (torch.backends.openmp.is_available() = "
                           f"{torch.backends.openmp.is_available()}), or this is a child after fork(), where "
                           "OpenMP would wait for the parent's threads; unset it to use lorakern's own pool")
    return threads


# storage -> {(address, bytes): back_with_huge_pages' result}, forgotten with the storage (a new
# weight at a freed one's address is moved again)
_backed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def back_with_huge_pages(t: torch.Tensor) -> int | None:
    """Move the whole huge pages (2 MiB on x86-64) inside a CPU tensor's bytes (a 4-bit weight's codes) onto huge
    pages, in place: same addresses and contents (Linux 6.1+, csrc/cpu/huge_pages.h). A call at
    M = 1 streams every byte of the weight once, one 4 KiB page per 8192 weights; on 2 MiB pages the
    page-table walks drop out (AMD EPYC Zen 3, AVX2, 2 threads, 8 cold copies, interleaved against
    the same weights on 4 KiB pages: 4096 x 4096 M = 1 0.96x the time, one thread 0.94x; 14336 ->
    4096 0.96x; 4096 -> 14336 0.99x; M = 4 0.97x; M = 16 1.0x). Returns the bytes now on huge pages,
    0 for none, -errno where the kernel refused (see the header), None where not tried: not on the
    CPU, under 2 MiB, a tensor subclass, no extension (or one built without this call), while
    torch.compile traces, or ``$LORAKERN_HUGE_PAGES=0``. Once per storage, address and size (ops
    and PEFT's bnb path rebuild weights from the same tensors on every call); a new storage at a
    freed one's address is moved again."""
    if (torch.compiler.is_compiling() or type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.is_cpu
            or t.nbytes < 1 << 21 or os.environ.get(HUGE_PAGES_ENV) == "0"):
        return None  # a subclass (FakeTensor, ...) may have no data pointer
    move = getattr(extension(), "back_with_huge_pages", None)  # None: no extension, or one built before it
    if move is None:
        return None
    done = _backed.setdefault(t.untyped_storage(), {})
    key = (t.data_ptr(), t.nbytes)
    if key not in done:
        done[key] = move(*key)
    return done[key]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def weight_args(w, rows: int, cols: int) -> tuple:
    return (_ptr(w.packed), _ptr(w.absmax), _ptr(w.nested_absmax), _ptr(w.nested_code), _ptr(w.offset),
            w.blocksize, rows, cols, _ptr(getattr(w, "native_code", None)), _ptr(getattr(w, "native_shift", None)),
            getattr(w, "native_scale_stride", 1), _ptr(getattr(w, "native_half_params", None)))


def _shape2d(w) -> tuple[int, int]:
    return (w.shape[0], w.numel // w.shape[0]) if len(w.shape) >= 2 else (1, w.numel)


def dequantize_into(w, out: torch.Tensor, start: int = 0) -> torch.Tensor:
    """``out.view(-1)[:] = W_flat[start : start + out.numel()]`` (out contiguous, fp32/bf16/fp16)."""
    rows, cols = _shape2d(w)
    args = weight_args(w, rows, cols)
    if out.device.type == "cuda":
        if start != 0:
            raise ValueError("the CUDA dequantize writes whole weights (start must be 0)")
        stream = torch.cuda.current_stream(out.device).cuda_stream
        extension().cuda_dequantize(args, out.numel(), out.data_ptr(), OUT_DTYPES[out.dtype], stream)
    else:
        extension().cpu_dequantize(args, start, out.numel(), out.data_ptr(), OUT_DTYPES[out.dtype], cpu_isa(),
                                   cpu_threads())
    return out


def cpu_matmul(x: torch.Tensor, w, transpose: bool) -> torch.Tensor:
    """Fused dequant-matmul on the CPU: ``x [M, in] @ W^T`` or ``x [M, out] @ W`` in x's dtype
    (float32, bfloat16 or float16; a half x is computed in float32 inside the call and the result
    rounded once, except a bfloat16 ``x W^T`` of 1 to 16 rows on the ``avx512-bf16`` path (1 and 2
    where ``in`` is a multiple of 128 and of the blocksize, blocksize >= 64): bfloat16 dot products
    on the weights rounded to bfloat16, summed in float32)."""
    rows, cols = w.shape
    x = x.contiguous()
    y = x.new_empty(x.shape[0], rows if not transpose else cols)
    extension().cpu_matmul(weight_args(w, rows, cols), x.data_ptr(), x.shape[0], y.data_ptr(), transpose,
                           cpu_isa(), cpu_threads(), x_dtype=OUT_DTYPES[x.dtype])
    return y


def cpu_qlora_forward(x: torch.Tensor, w, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float, pool: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole QLoRA forward in one call on the CPU for small M: ``(y, h)`` with ``h = x A^T``
    ``[M, r]`` (in A's dtype) and ``y = x W^T + bias + scaling h B^T`` ``[M, out]``, written once.
    Contiguous, of x's dtype (float32, or bfloat16 / float16: computed in float32 inside the call,
    y and h rounded once; the base of a bfloat16 x of 1 to 16 rows on the ``avx512-bf16`` path in
    bfloat16 dot products, see ``cpu_matmul``), except that with a half x the adapter (A and B) and the bias may each be
    float32 instead, read as they are (the caller checks). ``pool``: QA-LoRA's group size (``h``
    from x averaged over each group times ``cols / pool``, A ``[r, cols / pool]``), 0 for plain
    LoRA."""
    rows, cols = w.shape
    M, r = x.shape[0], lora_A.shape[0]
    y = x.new_empty(M, rows)
    h = x.new_empty(M, r, dtype=lora_A.dtype)
    lora = (lora_A.data_ptr(), lora_B.data_ptr(), _ptr(bias), float(scaling), r, h.data_ptr(), int(pool))
    extension().cpu_matmul(weight_args(w, rows, cols), x.data_ptr(), M, y.data_ptr(), False, cpu_isa(),
                           cpu_threads(), lora, x_dtype=OUT_DTYPES[x.dtype], lora_dtype=OUT_DTYPES[lora_A.dtype],
                           bias_dtype=-1 if bias is None else OUT_DTYPES[bias.dtype])
    return y, h


def cpu_multi_forward(x: torch.Tensor, w, bias: torch.Tensor | None, lora_A, lora_B, scalings,
                      index: torch.Tensor) -> torch.Tensor:
    """Several adapters over one NF4 base in one call on the CPU for small M: ``y [M, out]`` with
    ``y_m = x_m W^T + bias + s_a (x_m A_a^T) B_a^T``, ``a = index[m]`` (-1: none). ``lora_A[a]
    [r_a, in]``, ``lora_B[a] [out, r_a]``, x and bias float32 contiguous, index int64 [M] in range
    (the caller checks); the adapters are read where they lie (no stacking copy)."""
    rows, cols = w.shape
    M, r = x.shape[0], max(A.shape[0] for A in lora_A)
    y = x.new_empty(M, rows)
    h = x.new_empty(M, r)
    table, scales = _adapter_table(lora_A, lora_B, scalings, x.device)
    index = index if index.is_contiguous() else index.contiguous()
    lora = (0, 0, _ptr(bias), 1.0, r, h.data_ptr(), 0)
    multi = (index.data_ptr(), table[0].data_ptr(), table[1].data_ptr(), table[2].data_ptr(), scales.data_ptr())
    extension().cpu_matmul(weight_args(w, rows, cols), x.data_ptr(), M, y.data_ptr(), False, cpu_isa(),
                           cpu_threads(), lora, multi)
    return y


def cpu_lora_terms(y: torch.Tensor, x: torch.Tensor, lora_A, lora_B, scalings, index: torch.Tensor) -> torch.Tensor:
    """``y [M, out] += s_a (x_m A_a^T) B_a^T`` on each row m of an adapter (``a = index[m]``, -1:
    none), in place, in one call on the CPU: several adapters' terms over a base product computed
    elsewhere (a dense W). All float32; x, A_a and B_a with unit column stride, their rows any
    distance apart (stacked adapters' views are read in place), y contiguous; index int64 [M] in
    range (the caller checks)."""
    M, K = x.shape
    strided = strided_columns(x, lora_A, lora_B)
    if strided is not None:
        raise ValueError(f"{strided}: expected unit column stride")
    table, scales = _adapter_table(lora_A, lora_B, scalings, x.device)
    strides = torch.tensor([[A.stride(0) for A in lora_A], [B.stride(0) for B in lora_B]], dtype=torch.int64)
    index = index.contiguous()
    multi = (index.data_ptr(), table[0].data_ptr(), table[1].data_ptr(), table[2].data_ptr(), scales.data_ptr())
    extension().cpu_lora_terms(x.data_ptr(), x.stride(0), M, K, y.shape[1], y.data_ptr(), multi,
                               strides[0].data_ptr(), strides[1].data_ptr(), len(lora_A),
                               max(A.shape[0] for A in lora_A), cpu_isa(), cpu_threads())
    return y


def strided_columns(x: torch.Tensor, lora_A, lora_B) -> str | None:
    """The name of the first of x, lora_A[a], lora_B[a] whose columns are not adjacent (what
    :func:`cpu_lora_terms` cannot read in place), or None."""
    for name, t in (("x", x), *((f"lora_A[{a}]", A) for a, A in enumerate(lora_A)),
                    *((f"lora_B[{a}]", B) for a, B in enumerate(lora_B))):
        if t.shape[1] > 1 and t.stride(1) != 1:
            return name
    return None


# Adapter tables by their contents (addresses, ranks, scalings, device): a serving loop calls every
# layer with the same adapters, and building the two small tensors costs ~15 us a call (CPU; on
# CUDA two host-to-device copies) against ~2 us to look them up. A table is a pure function of its
# key, so an address reused by another tensor of the same rank still finds the right table.
_TABLES: dict = {}
_TABLES_MAX = 256


def _adapter_table(lora_A, lora_B, scalings, device) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels read of several adapters: int64 ``[3, n]`` (A addresses, B addresses,
    ranks) and float32 ``[n]`` scalings, on ``device`` (built once per distinct key, see _TABLES)."""
    key = (device, *(A.data_ptr() for A in lora_A), *(B.data_ptr() for B in lora_B),
           *(A.shape[0] for A in lora_A), struct.pack(f"{len(scalings)}d", *scalings))  # bytes: -0.0 is not 0.0
    found = _TABLES.get(key)
    if found is None:
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        n = len(lora_A)
        table = torch.tensor(list(key[1:1 + 3 * n]), dtype=torch.int64).view(3, n)
        scales = torch.tensor([float(s) for s in scalings], dtype=torch.float32)
        found = _TABLES[key] = (table.to(device), scales.to(device))
    return found


def cuda_gemv(x: torch.Tensor, w) -> torch.Tensor:
    """Fused dequant-GEMV on the GPU for small M: ``x [M, in] @ W^T`` in x's dtype (fp32 accumulation)."""
    rows, cols = w.shape
    x = x.contiguous()
    y = x.new_empty(x.shape[0], rows)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    extension().cuda_gemv(weight_args(w, rows, cols), x.data_ptr(), x.shape[0], y.data_ptr(), OUT_DTYPES[x.dtype],
                          stream)
    return y


def cuda_multi_forward(x: torch.Tensor, w, bias: torch.Tensor | None, lora_A, lora_B, scalings,
                       index: torch.Tensor) -> torch.Tensor:
    """:func:`cpu_multi_forward` on the GPU for small M: the NF4 (or INT4) GEMV with each row's
    adapter term and the bias added as it writes the row, after one small kernel for ``h [M, r]``.
    x, bias and the adapters in one dtype (fp32 / bf16 / fp16), contiguous, on x's device; index
    int64 [M] in range there (the caller checks). The adapters are read where they lie."""
    rows, cols = w.shape
    M, r = x.shape[0], max(A.shape[0] for A in lora_A)
    device = x.device
    y = x.new_empty(M, rows)
    h = torch.empty(M, r, device=device, dtype=torch.float32)
    table, scales = _adapter_table(lora_A, lora_B, scalings, device)
    index = index.to(torch.int64).contiguous()
    lora = (index.data_ptr(), table[0].data_ptr(), table[1].data_ptr(), table[2].data_ptr(), scales.data_ptr(),
            _ptr(bias), h.data_ptr(), r)
    stream = torch.cuda.current_stream(device).cuda_stream
    extension().cuda_gemv_multi(weight_args(w, rows, cols), x.data_ptr(), M, y.data_ptr(), OUT_DTYPES[x.dtype],
                                stream, lora)
    return y
