"""Ahead-of-time compilation of every Triton and CUDA kernel for real GPU targets, with a resource report.

The Triton interpreter checks arithmetic but accepts programs no GPU compiles (``tl.dot`` with an
inner dimension below 16, for one). This module drives the real launchers on "meta" tensors under
``record_launches`` (so it compiles exactly the kernels, constexprs, argument specializations and
candidate configs that a launch on a GPU can use), compiles each for sm_80 / sm_90 with Triton's
own compiler and ptxas, and reads registers, spills and shared memory from the cubin (ptxas -v
where it has a stack frame) and the MMA instruction from the PTX.

    python -m lorakern.aot --arch 80,90 --json aot.json [--full] [--no-cuda] [--variants lora,dora,multi]

The .cu kernels under csrc/ are compiled with nvcc in the same run (see :mod:`lorakern.aot_cuda`).

Exits non-zero on any failed compile, any spill, shared memory over the arch's limit, or a
16-bit / TF32 tensor-core tile of 64+ rows on sm_90 that does not use wgmma (tiles of 16 or 32
rows, the decode configs, cannot: a wgmma is 64 rows per warpgroup, so they use mma.sync).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from itertools import product

if __name__ == "__main__":  # compile, never interpret (before triton is imported; not on a plain import,
    os.environ["TRITON_INTERPRET"] = "0"  # which must not switch an interpreting process, e.g. the tests)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

# The Triton each CUDA build of torch pins (torch's own requirements; a CPU build pins none). The
# range lorakern checks (tools/triton_matrix.py) is the Tritons of this table from 3.5 on.
TRITON_OF_TORCH = {"2.7.0": "3.3.0", "2.7.1": "3.3.1", "2.8.0": "3.4.0", "2.9.0": "3.5.0", "2.9.1": "3.5.1",
                   "2.10.0": "3.6.0", "2.11.0": "3.6.0", "2.12.0": "3.7.0", "2.12.1": "3.7.1", "2.13.0": "3.7.1",
                   "2.14.0": "3.8.0", "2.14.1": "3.8.0"}

# Largest dynamic shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# What each launch computes (the dY pass is recorded both ways: once, or twice; see triton/lora.py)
ROLES = ("h", "y", "dh,dB,dbias", "dh", "dB,dbias", "dA", "dx", "WA", "y base", "dx base",
         "multi h", "multi y", "multi dh", "multi dA", "multi dB", "multi dx")


def _shape_specs(full: bool):
    """(dtype, r, bias, dropout, M, K, N, tf32[, dora | multi]) combinations whose launches are compiled.

    Default (a covering subset for CI): every dtype at r = 8 and 32 (BLOCK_R 16 and 32, a rank
    that is and is not a multiple of 16), 16-bit at r = 64 or 256 (the skinny kernel's BLOCK_R
    64), bf16 also at r = 1, 16 (Triton specializes an int
    equal to 1 or divisible by 16); with and without bias and dropout; M=1 (decode configs), 64
    (medium), 4096 (large) on 4096 x 4096, and unaligned shapes (M=4095, 4097 x 11001: no
    divisibility hints, the unaligned configs) at r = 1, 8, 32. int64 offsets (M=2**20), every
    rank in every dtype and TF32 are --full's. --full: every
    dtype x rank in (1, 8, 16, 32, 64, 128, 256) x bias x dropout x M in (1, 16, 64, 4095, 4096,
    2**20) x aligned/unaligned x TF32 on/off for fp32."""
    if full:
        ranks = {d: (1, 8, 16, 32, 64, 128, 256) for d in DTYPES}
        for dtype in DTYPES:
            for r, bias, p, M, (K, N) in product(ranks[dtype], (True, False), (0.0, 0.1),
                                                 (1, 16, 64, 4096, 4095, 1 << 20), ((4096, 4096), (4097, 11001))):
                for tf32 in ((False, True) if dtype == "fp32" else (False,)):
                    for variant in ({}, {"dora": True}, {"multi": True}):
                        yield dict(dtype=dtype, r=r, bias=bias, dropout=p, M=M, K=K, N=N, tf32=tf32, **variant)
        return
    ranks = {"fp16": (8, 32, 64), "bf16": (1, 8, 16, 32, 256), "fp32": (8, 32)}
    for dtype in DTYPES:
        for r, bias, p, M in product(ranks[dtype], (True, False), (0.0, 0.1), (1, 64, 4096)):
            yield dict(dtype=dtype, r=r, bias=bias, dropout=p, M=M, K=4096, N=4096, tf32=False)
        for r, bias, p in product((1, 8, 32), (True, False), (0.0, 0.1)):  # rank == 1, odd, % 16
            yield dict(dtype=dtype, r=r, bias=bias, dropout=p, M=4095, K=4097, N=11001, tf32=False)
        # DoRA: its matmul variants (per-row scale, z, dropout on x, per-K scale, add to out) and
        # the dY pass with dm, at each regime's tiles and LoRA's ranks (every BLOCK_R).
        for r, bias, p, M in product(ranks[dtype], (True, False), (0.0, 0.1), (1, 64, 4096)):
            yield dict(dtype=dtype, r=r, bias=bias, dropout=p, M=M, K=4096, N=4096, tf32=False, dora=True)
        for r, bias, p in product((8, 32), (True, False), (0.0, 0.1)):
            yield dict(dtype=dtype, r=r, bias=bias, dropout=p, M=4095, K=4097, N=11001, tf32=False, dora=True)
        # Several adapters per batch: decode (rows as they come) and sorted tiles, every BLOCK_R.
        for r, bias, p, M in product(ranks[dtype], (True, False), (0.0, 0.1), (1, 64, 4096)):
            yield dict(dtype=dtype, r=r, bias=bias, dropout=p, M=M, K=4096, N=4096, tf32=False, multi=True)
        for r, bias, p, M in product((1, 8, 32), (True, False), (0.0, 0.1), (7, 4095)):  # 7: unsorted rows
            yield dict(dtype=dtype, r=r, bias=bias, dropout=p, M=M, K=4097, N=11001, tf32=False, multi=True)


def record(spec) -> list:
    """The launches of one forward and one backward for ``spec``: ``(role, candidates)`` each."""
    from .triton import lora
    from .triton.launch import record_launches

    dt, M, K, N, r = DTYPES[spec["dtype"]], spec["M"], spec["K"], spec["N"], spec["r"]
    meta = dict(device="meta", dtype=dt)
    x, w, a, b = (torch.empty(*s, **meta) for s in ((M, K), (N, K), (r, K), (N, r)))
    bias = torch.empty(N, **meta) if spec["bias"] else None
    seed = torch.empty((), device="meta", dtype=torch.int64)
    p = spec["dropout"]
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = spec["tf32"]  # the launchers read it for fp32's dot
    try:
        with record_launches() as launches:
            dy = torch.empty(M, N, **meta)
            if spec.get("multi"):
                _record_multi(x, w, bias, r, p, seed, dy, spec["bias"])
            elif spec.get("dora"):
                g = norm = torch.empty(N, device="meta", dtype=torch.float32)
                lora.weight_a(w, a)
                lora.dora_forward(x, w, bias, a, b, 2.0, p, seed, g, keep_z=False)  # inference: no z
                _, h, z = lora.dora_forward(x, w, bias, a, b, 2.0, p, seed, g, keep_z=True)
                lora.dora_backward(dy, x, w, a, b, h, z, norm, g, 2.0, p, seed, True, True, spec["bias"])
            else:
                _, h = lora.forward(x, w, bias, a, b, 2.0, p, seed)
                lora.backward(dy, x, w, a, b, h, 2.0, p, seed, True, True, spec["bias"])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return launches


def _record_multi(x, w, bias, r, p, seed, dy, needs_dbias, n=4):
    """One forward and one backward of the several-adapters kernels (n adapters of rank r)."""
    from .triton import multi

    meta = dict(device="meta", dtype=x.dtype)
    A, B = torch.empty(n, r, x.shape[1], **meta), torch.empty(n, w.shape[0], r, **meta)
    index = torch.empty(x.shape[0], device="meta", dtype=torch.int32)
    adapters = multi.Adapters([r] * n, [2.0] * n, [p] * n, "meta")
    _, h = multi.forward(x, w, bias, A, B, index, adapters, seed)
    multi.backward(dy, x, w, A, B, h, index, adapters, seed, True, True, needs_dbias)


def specialize(value) -> tuple[str, object]:
    """``(signature type, key)`` of one launch argument, as Triton's JIT specializes it on every
    version from 3.3 to 3.9 (3.6+ does it in C++, ``native_specialize_impl``; 3.3-3.5 in Python,
    with private signatures that differ each release): ints equal to 1 become the constexpr 1;
    other ints are i32 / i64 and get key "D" when divisible by 16; tensors are ``*<dtype>`` with
    "D" when their address is 16-byte aligned (torch's allocations are; "meta" tensors report 0)."""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, "D" if value % 16 == 0 else None
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
        return "*" + names[value.dtype], "D" if value.data_ptr() % 16 == 0 else None
    raise TypeError(f"no specialization rule for a launch argument of type {type(value).__name__}")


def compile_job(kernel, kwargs, arch: int) -> dict:
    """Turn one recorded launch into a picklable compile job, specializing arguments as Triton's
    JIT does for a real launch (ints equal to 1 become constants; multiples of 16 and tensors get
    the divisibility hint)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = kwargs[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, key = specialize(value)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return dict(
        kernel=kernel.fn.__name__, arch=arch, signature=signature, constexprs=constexprs,
        attrs=sorted(attrs.items()), options={"num_warps": kwargs["num_warps"], "num_stages": kwargs["num_stages"]},
        config={**{k: v for k, v in constexprs.items() if k.startswith(("BLOCK_", "GROUP_"))}, **{
            "num_warps": kwargs["num_warps"], "num_stages": kwargs["num_stages"]}},
    )


# The constexprs that choose a kernel variant (the rest are block sizes and launch options).
VARIANT_PREFIXES = ("HAS_", "USE_", "PRECISION", "A_", "OUT_", "COL_", "STORE_", "ADD_")


def verified_key(job) -> str:
    """What a launcher's choice must match in the sweep: kernel, dtype, every block size and
    boolean variant, warps and stages (int specializations of shapes aside)."""
    prefixes = VARIANT_PREFIXES + ("BLOCK_",)
    variant = sorted((k, v) for k, v in job["constexprs"].items() if k.startswith(prefixes))
    return json.dumps([job["kernel"], job["signature"]["a_ptr"], variant, job["options"]["num_warps"],
                       job["options"]["num_stages"]])


def _job_key(job) -> str:
    return json.dumps([job["kernel"], job["arch"], job["signature"], job["constexprs"], job["attrs"], job["options"]],
                      sort_keys=True, default=str)


def ptxas_path(arch: int) -> str:
    """The ptxas that Triton ships: ``get_ptxas(arch).path`` (3.6+), ``get_ptxas().path`` (3.4-3.5),
    ``get_ptxas(arch)[0]`` (3.3)."""
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(arch)
    except TypeError:  # 3.4-3.5 take no arch
        tool = nv.get_ptxas()
    return tool[0] if isinstance(tool, tuple) else tool.path


def _ptxas_report(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if out.returncode != 0 or regs is None or spills is None:  # no report must never read as no spills
        raise RuntimeError(f"ptxas -v gave no resource report: {text.strip()[-300:]}")
    smem = re.search(r"(\d+) bytes smem", text)
    return {
        "regs": int(regs.group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
        "static_shared": int(smem.group(1)) if smem else 0,
    }


# .nv.info attributes (format 4: a 2-byte size, then the data): the kernel's symbol index and a
# 32-bit value.
_EIATTR_FRAME_SIZE, _EIATTR_REGCOUNT = 0x11, 0x2F


def _elf_sections(elf: bytes) -> list[tuple[str, int, int, int]]:
    """(name, offset, size, link) of each section of a 64-bit little-endian ELF (a cubin)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    heads = [struct.unpack_from("<IIQQQQII", elf, shoff + i * shentsize) for i in range(shnum)]
    names_at = heads[shstrndx][4]
    return [(_c_string(elf, names_at + h[0]), h[4], h[5], h[6]) for h in heads]


def _c_string(buf: bytes, at: int) -> str:
    return buf[at:buf.index(b"\0", at)].decode()


def _symbol_index(elf: bytes, sections, symbol: str) -> int:
    symtab = next((sec for sec in sections if sec[0] == ".symtab"), None)
    if symtab is None:
        raise ValueError("the cubin has no .symtab")
    _, off, size, link = symtab
    names_at = sections[link][1]
    for i in range(size // 24):  # Elf64_Sym: name, info, other, shndx, value, size
        if _c_string(elf, names_at + struct.unpack_from("<I", elf, off + 24 * i)[0]) == symbol:
            return i
    raise ValueError(f"no symbol {symbol!r} in the cubin")


def _cubin_report(cubin: bytes, kernel: str, arch: int) -> dict:
    """Registers, stack frame and static shared memory of ``kernel`` as ptxas wrote them into the
    cubin Triton built (its own ptxas run, with its own options): EIATTR_REGCOUNT and
    EIATTR_FRAME_SIZE of the kernel's symbol in ``.nv.info``, the size of ``.nv.shared.<kernel>``.
    A frame of 0 bytes means no local memory, so no spills; a frame above 0 says nothing of how
    much of it is spills, so the caller asks ``ptxas -v`` then. On sm_90 the section also holds
    the 1 KiB the hardware reserves per block (``.nv.shared.reserved.0`` marks that layout), which
    ``ptxas -v`` does not count: left out here too. Checked against ``ptxas -v`` on every job of
    the default sweep (4130 compiles, Triton 3.7.1): the same registers and shared memory, and a
    0-byte frame exactly where ptxas reports no spills."""
    sections = _elf_sections(cubin)
    sym = _symbol_index(cubin, sections, kernel)
    by_name = {sec[0]: sec for sec in sections}
    _, off, size, _ = by_name[".nv.info"]
    values, p = {}, off
    while p < off + size:
        fmt, attr = cubin[p], cubin[p + 1]
        if fmt == 4:  # EIFMT_SVAL
            n = struct.unpack_from("<H", cubin, p + 2)[0]
            if attr in (_EIATTR_FRAME_SIZE, _EIATTR_REGCOUNT) and n == 8:
                index, value = struct.unpack_from("<II", cubin, p + 4)
                if index == sym:
                    values[attr] = value
            p += 4 + n
        elif fmt == 3:  # EIFMT_HVAL: 2 bytes
            p += 4
        elif fmt == 2:  # EIFMT_BVAL: 1 byte
            p += 3
        else:  # EIFMT_NVAL: none
            p += 2
    if set(values) != {_EIATTR_FRAME_SIZE, _EIATTR_REGCOUNT}:
        raise ValueError(f"the cubin's .nv.info gives no register count or frame size for {kernel}")
    shared = by_name[f".nv.shared.{kernel}"][2] if f".nv.shared.{kernel}" in by_name else 0
    if arch >= 90 and ".nv.shared.reserved.0" in by_name:
        shared = max(0, shared - 1024)
    return {"regs": values[_EIATTR_REGCOUNT], "frame_bytes": values[_EIATTR_FRAME_SIZE], "static_shared": shared}


def run_job(job) -> dict:
    """Compile one job (in a worker process) and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton import kernels

    fn = getattr(kernels, job["kernel"])
    attrs = {tuple(k): v for k, v in job["attrs"]}
    rec = {k: job[k] for k in ("kernel", "arch", "config")}
    c = job["constexprs"]
    rec.update(
        dtype=job["signature"]["a_ptr"].lstrip("*"), block_r=c.get("BLOCK_R"),
        variant={k: v for k, v in c.items() if k.startswith(VARIANT_PREFIXES)},
        ok=False, error=None, regs=None, spill_bytes=None, shared_bytes=None, mma=None,
    )
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=c, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        ptx = k.asm["ptx"]
        try:
            res = _cubin_report(k.asm["cubin"], k.metadata.name, job["arch"])
        except (ValueError, KeyError, IndexError, struct.error):  # a cubin laid out otherwise: ask ptxas
            res = {"frame_bytes": None}
        if res["frame_bytes"] != 0:  # local memory: how much of it is spills, ptxas -v says
            res = _ptxas_report(ptx, job["arch"])
        else:
            res["spill_bytes"] = 0
        rec.update(ok=True, regs=res["regs"], spill_bytes=res["spill_bytes"],
                   shared_bytes=k.metadata.shared + res["static_shared"])
        rec["mma"] = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "none")
    except Exception as e:  # a failed compile is a result, reported and counted
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def violations(rec) -> list[str]:
    out = []
    if not rec["ok"]:
        return [f"compile failed: {rec['error']}"]
    if rec["spill_bytes"]:
        out.append(f"spills {rec['spill_bytes']} bytes")
    if rec["shared_bytes"] > SHARED_LIMIT[rec["arch"]]:
        out.append(f"shared {rec['shared_bytes']} > {SHARED_LIMIT[rec['arch']]}")
    if rec.get("cuda"):  # nvcc-compiled SIMT kernels: no local memory, no MMA rule (see aot_cuda)
        if rec["stack_bytes"]:
            out.append(f"stack frame {rec['stack_bytes']} bytes (local memory)")
        return out
    tensor_cores = rec["dtype"] != "fp32" or rec["variant"].get("PRECISION") == "tf32"
    if rec["arch"] >= 90 and tensor_cores and rec["config"]["BLOCK_M"] >= 64 and rec["mma"] != "wgmma":
        out.append(f"sm_90 tile of {rec['config']['BLOCK_M']} rows uses {rec['mma']}, not wgmma")
    return out


def variant_of(spec) -> str:
    return "multi" if spec.get("multi") else "dora" if spec.get("dora") else "lora"


def collect_jobs(archs, full: bool, variants=("lora", "dora", "multi")):
    """All distinct compile jobs, each with the roles and ranks that use it."""
    jobs: dict[str, dict] = {}
    for spec in _shape_specs(full):
        if variant_of(spec) not in variants:
            continue
        for role, candidates in record(spec):
            for kernel, _cfg, _grid, kwargs in candidates:
                for arch in archs:
                    job = compile_job(kernel, kwargs, arch)
                    entry = jobs.setdefault(_job_key(job), {**job, "roles": set(), "ranks": set()})
                    entry["roles"].add(role)
                    entry["ranks"].add(spec["r"])
    return list(jobs.values())


def _per_kernel(records) -> dict:
    """(kernel, arch) -> compiles, failures, and the largest registers, spills, shared memory."""
    rows = {}
    for r in records:
        row = rows.setdefault((r["kernel"], r["arch"]),
                              {"n": 0, "fail": 0, "regs": 0, "spill": 0, "shared": 0, "mma": set()})
        row["n"] += 1
        row["fail"] += bool(r["violations"])
        if r["ok"]:
            row["regs"] = max(row["regs"], r["regs"])
            row["spill"] = max(row["spill"], r["spill_bytes"])
            row["shared"] = max(row["shared"], r["shared_bytes"])
            row["mma"].add(r["mma"])
    return rows


def summarize(records) -> str:
    rows = _per_kernel(records)
    lines = [f"{'kernel':<20} {'arch':>5} {'compiles':>8} {'bad':>4} {'max regs':>8} {'max spill':>9} "
             f"{'max shared':>10}  mma"]
    for (kernel, arch), row in sorted(rows.items()):
        lines.append(f"{kernel:<20} sm_{arch:<2} {row['n']:>8} {row['fail']:>4} {row['regs']:>8} {row['spill']:>9} "
                     f"{row['shared']:>10}  {','.join(sorted(row['mma']))}")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes // 1024} KiB" if nbytes >= 1024 else f"{nbytes} B"


def markdown(records) -> str:
    """The "verified targets" table of README, from the records."""
    rows = _per_kernel(records)
    lines = ["| kernel | arch | compiles | failing | max registers | max shared memory | max spill | MMA |",
             "|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), row in sorted(rows.items()):
        lines.append(f"| `{kernel}` | sm_{arch} | {row['n']} | {row['fail']} | {row['regs']} | "
                     f"{_size(row['shared'])} | {row['spill']} B | {', '.join(sorted(row['mma']))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakern.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities, e.g. 80,90")
    parser.add_argument("--json", help="write one record per compile to this file")
    parser.add_argument("--full", action="store_true", help="sweep every dtype, rank, variant and shape class")
    parser.add_argument("--markdown", help="write the summary as a markdown table to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc compiles of csrc/**/*.cu")
    parser.add_argument("--variants", default="lora,dora,multi",
                        help="comma-separated launch sequences: lora, dora (magnitude), multi (several adapters)")
    args = parser.parse_args(argv)
    variants = tuple(args.variants.split(","))
    if not variants or any(v not in ("lora", "dora", "multi") for v in variants):
        parser.error(f"--variants: expected a comma-separated subset of lora,dora,multi, got {args.variants!r}")
    archs = [int(a) for a in args.arch.split(",")]
    t0 = time.time()
    jobs = collect_jobs(archs, args.full, variants)
    print(f"lorakern.aot: {len(jobs)} distinct Triton compiles for sm_{', sm_'.join(map(str, archs))}", flush=True)
    records = []
    with futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, rec in enumerate(pool.map(run_job, jobs, chunksize=4), 1):
            records.append(rec)
            if i % 100 == 0 or i == len(jobs):
                print(f"  {i}/{len(jobs)} compiled ({time.time() - t0:.0f} s)", flush=True)
    for job, rec in zip(jobs, records):
        rec["roles"], rec["ranks"] = sorted(job["roles"]), sorted(job["ranks"])
    if not args.no_cuda:
        from .aot_cuda import cuda_records

        cuda, skipped = cuda_records(archs)
        print(f"lorakern.aot: {skipped}" if skipped else f"lorakern.aot: {len(cuda)} CUDA kernel instantiations "
              f"compiled with nvcc ({time.time() - t0:.0f} s)", flush=True)
        for rec in cuda:
            rec["roles"], rec["ranks"] = [], []
        records += cuda
    for rec in records:
        rec["violations"] = violations(rec)
    print(summarize(records))
    bad = [r for r in records if r["violations"]]
    for r in bad:
        print(f"FAIL {r['kernel']} sm_{r['arch']} {r['dtype']} ranks={r['ranks']} {r['config']} {r['variant']}: "
              f"{'; '.join(r['violations'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(records) + "\n")
    print(f"lorakern.aot: {len(records) - len(bad)} ok, {len(bad)} failing, {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
