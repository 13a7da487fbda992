"""The CUDA half of the ahead-of-time report: every .cu under csrc/ compiled with nvcc for sm_80 and
sm_90a, ptxas' verbose output parsed per kernel instantiation into the records :mod:`lorakern.aot`
writes (registers, spills, stack / local memory, shared memory, MMA instruction).

Rules (checked by :func:`lorakern.aot.violations`): the compile succeeds without warnings, no spill
stores or loads, no stack frame (a data-indexed local array lives in DRAM-backed local memory),
shared memory within the arch's limit. The NF4 kernels are memory-bound SIMT code (a GEMV at
M <= 16 and a dequantize): they use no tensor cores by design, so the wgmma rule does not apply.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

NVCC_ARCH = {80: "sm_80", 90: "sm_90a"}
_DTYPE = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}


def csrc_dir() -> Path | None:
    """The repository's csrc/ (present in a source checkout / editable install)."""
    root = Path(__file__).resolve().parent.parent / "csrc"
    return root if root.is_dir() else None


def find_nvcc() -> str | None:
    for cand in ("/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if cand and Path(cand).is_file():
            return cand
    return None


def cuda_sources() -> list[Path]:
    root = csrc_dir()
    return sorted(root.rglob("*.cu")) if root is not None else []


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str, arch: int, source: str) -> list[dict]:
    """One record per ``Compiling entry function`` block of ``nvcc -Xptxas -v`` output."""
    records: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = records.setdefault(m.group(1), {"regs": 0, "spill_bytes": 0, "stack_bytes": 0,
                                                      "shared_bytes": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack_bytes"] = int(m.group(1))
            current["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    names = _demangle(list(records))
    out = []
    for mangled, rec in records.items():
        pretty = names[mangled]
        kernel, targs = _kernel_and_template(pretty)
        args = [a.strip() for a in targs.split(",") if a.strip()]
        dtype = next((_DTYPE[a] for a in args if a in _DTYPE), None)
        out.append({"kernel": kernel, "arch": arch, "dtype": dtype, "r": None,
                    "config": {"template": targs}, "variant": {"source": source}, "ok": True, "error": None,
                    "mma": "none", "cuda": True, **rec})
    return out


def _kernel_and_template(pretty: str) -> tuple[str, str]:
    """``("gemv_kernel", "__half, 8, Decode=0")`` from a demangled name such as ``void ns::(anonymous
    namespace)::gemv_kernel<__half, 8, (ns::(anonymous namespace)::Decode)0>(...)``: enum arguments
    print as casts, whose parentheses a plain pattern would take for the parameter list."""
    m = re.search(r"(\w+)<", pretty)
    if m is None:
        return pretty.split("(")[0].split("::")[-1].split()[-1], ""
    depth, start = 1, m.end()
    for i in range(start, len(pretty)):
        depth += {"<": 1, ">": -1}.get(pretty[i], 0)
        if depth == 0:
            targs = pretty[start:i]
            break
    else:
        return m.group(1), ""
    return m.group(1), re.sub(r"\((?:[^()]|\([^()]*\))*::(\w+)\)(-?\d+)", r"\1=\2", targs)


def compile_cu(path: Path, arch: int, nvcc: str) -> list[dict]:
    """Compile ``path`` for ``arch`` (80 or 90) and return its kernels' records (or one failing record)."""
    include = csrc_dir()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", "-O3", "-c", str(path), "-o", str(Path(tmp) / "k.o"), f"-arch={NVCC_ARCH[arch]}",
               f"-I{include}", "-Xptxas", "-v", "-Xptxas", "-warn-spills", "-Xptxas", "-warn-lmem-usage"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    source = str(path.relative_to(include.parent)) if include else path.name
    warnings = [ln for ln in text.splitlines() if "warning" in ln.lower()]
    if proc.returncode != 0 or warnings:
        return [_failed(path, arch, source, ("\n".join(warnings) or text)[-2000:])]
    return parse_ptxas(text, arch, source) or [_failed(path, arch, source, "ptxas printed no per-kernel report")]


def _failed(path: Path, arch: int, source: str, error: str) -> dict:
    """The one record of a .cu file that did not compile cleanly for ``arch``."""
    return {"kernel": path.stem, "arch": arch, "dtype": None, "r": None, "config": {}, "variant": {"source": source},
            "ok": False, "cuda": True, "error": error, "regs": 0, "spill_bytes": 0, "stack_bytes": 0,
            "shared_bytes": 0, "mma": "none"}


def cuda_records(archs: list[int]) -> tuple[list[dict], str | None]:
    """All records for all .cu files, or ``([], reason)`` when they cannot be compiled here."""
    nvcc = find_nvcc()
    if nvcc is None:
        return [], "nvcc not found: the CUDA sources were not compiled"
    sources = cuda_sources()
    if not sources:
        return [], "csrc/ not found next to the package (a non-editable install): CUDA sources not compiled"
    return [rec for src in sources for arch in archs for rec in compile_cu(src, arch, nvcc)], None
