"""Ahead-of-time compilation for sm_80 / sm_90 (no GPU needed) and the launchers' config choice."""

import json
import os
import shutil
import sys

import pytest
from helpers import run_process_group

pytest.importorskip("triton")


def _in_subprocess(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = run_process_group([sys.executable, "-c", code], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_triton_is_the_one_the_cuda_build_of_this_torch_pins():
    """The tests check the Triton that GPU users of this torch run: a CUDA build of torch installs
    the Triton it pins; beside a CPU build, which pins none (plain pip would take the newest),
    README's test command installs the one the CUDA build of the same release pins."""
    import torch
    import triton

    from lorakern.aot import TRITON_OF_TORCH

    release = torch.__version__.split("+")[0]
    if release not in TRITON_OF_TORCH:
        pytest.skip(f"torch {release}: which Triton its CUDA build pins is not recorded in lorakern.aot")
    assert triton.__version__ == TRITON_OF_TORCH[release], (
        f"triton {triton.__version__} beside torch {torch.__version__}, whose CUDA build pins "
        f"{TRITON_OF_TORCH[release]}: pip install triton=={TRITON_OF_TORCH[release]}")


def test_launcher_choices_are_all_in_the_default_sweep():
    """Every config a launcher can pick (every autotune candidate) for many shapes was compiled by
    the default sweep: M = 0, 1, 7, 16, 33, 64, 4096, 65537, odd in/out, r from 1 to 256, every dtype,
    LoRA, DoRA and several adapters per batch."""
    code = r'''
import json, torch
from itertools import product
import lorakern.aot as aot
verified = {aot.verified_key(j) for j in aot.collect_jobs([90], False)}
missing, checked = set(), 0
for dtype in aot.DTYPES:
    for M in (0, 1, 7, 16, 33, 64, 4096, 65537):
        for (K, N) in ((4096, 4096), (4096, 14336), (45, 53), (4097, 11001)):
            for r in (1, 3, 8, 16, 33, 64, 100, 256):
                for bias in (True, False):
                    for p, variant in product((0.0, 0.1), ({}, {"dora": True}, {"multi": True})):
                        spec = dict(dtype=dtype, r=r, bias=bias, dropout=p, M=M, K=K, N=N, tf32=False, **variant)
                        for role, cands in aot.record(spec):
                            for kernel, _cfg, _grid, kw in cands:
                                key = aot.verified_key(aot.compile_job(kernel, kw, 90))
                                checked += 1
                                if key not in verified:
                                    missing.add((role, key))
print(json.dumps({"checked": checked, "missing": sorted(missing)[:20], "n_missing": len(missing)}))
'''
    result = json.loads(_in_subprocess(code).strip().splitlines()[-1])
    assert result["checked"] > 1000
    assert result["n_missing"] == 0, result["missing"]


@pytest.mark.slow
def test_default_sweep_compiles_for_sm80_sm90(tmp_path):
    """python -m lorakern.aot: every kernel compiles for sm_80 and sm_90, no spills, shared memory
    within the limit, wgmma on sm_90 for 64+ row tiles; ranks 1, 8, 16, 256 covered."""
    out = tmp_path / "aot.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = run_process_group([sys.executable, "-m", "lorakern.aot", "--arch", "80,90", "--json", str(out)], env=env)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    recs = json.loads(out.read_text())
    assert all(r["ok"] and not r["violations"] for r in recs)
    kernels = {(r["kernel"], r["arch"]) for r in recs}
    names = ["lora_matmul_kernel", "skinny_kernel", "dy_kernel", "multi_matmul_kernel", "multi_skinny_kernel",
             "segment_skinny_kernel"]
    if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        names += ["dequantize_kernel", "gemv_kernel", "multi_h_kernel"]  # the NF4 .cu kernels, compiled by nvcc
    assert kernels == {(k, a) for k in names for a in (80, 90)}
    assert {1, 8, 16, 256} <= {rank for r in recs for rank in r["ranks"]}
    assert {"fp16", "bf16", "fp32"} == {r["dtype"] for r in recs}
    assert any(r["mma"] == "wgmma" for r in recs if r["arch"] == 90)
    from lorakern.aot import ROLES

    assert set(ROLES) == {role for r in recs for role in r["roles"]}  # LoRA's, DoRA's (WA, ... base), several adapters'


# gemv_kernel<__half, 8, Decode 1> (the INT4 base's table): an enum argument demangles as a cast,
# "(lorakern::cuda::(anonymous namespace)::Decode)1", parentheses inside the template arguments.
GEMV = ("_ZN8lorakern4cuda44_GLOBAL__N__7930b9ca_11_nf4_cuda_cu_828420f711gemv_kernelI6__halfLi8ELNS1_6DecodeE1EEEvNS_"
        "9Nf4WeightEPKT_lPS6_l")
PTXAS_SAMPLE = f"""\
ptxas info    : Compiling entry function '{GEMV}' for 'sm_90a'
ptxas info    : Function properties for {GEMV}
    64 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 64 bytes smem, 448 bytes cmem[0]
"""


def test_ptxas_report_parsing_and_rules():
    from lorakern.aot import violations
    from lorakern.aot_cuda import parse_ptxas

    (rec,) = parse_ptxas(PTXAS_SAMPLE, 90, "csrc/cuda/nf4_cuda.cu")
    assert rec["kernel"] == "gemv_kernel" and rec["dtype"] == "fp16"
    assert rec["config"]["template"] == "__half, 8, Decode=1"
    assert (rec["regs"], rec["spill_bytes"], rec["stack_bytes"], rec["shared_bytes"]) == (72, 12, 64, 64)
    assert violations(rec) == ["spills 12 bytes", "stack frame 64 bytes (local memory)"]


def test_resources_read_from_the_cubin_match_ptxas():
    """The sweep reads registers, stack frame and static shared memory from the cubin Triton built
    (no second ptxas run): on one job of each kernel and arch, the same as ``ptxas -v`` on the
    PTX; a job whose cubin has a stack frame asks ptxas for its spills."""
    code = r'''
import json
import lorakern.aot as aot
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lorakern.triton import kernels
jobs, seen = [], set()
for job in aot.collect_jobs([80, 90], False):
    if (job["kernel"], job["arch"]) not in seen:
        seen.add((job["kernel"], job["arch"]))
        jobs.append(job)
out = []
for job in jobs:
    src = ASTSource(fn=getattr(kernels, job["kernel"]), signature=job["signature"], constexprs=job["constexprs"],
                    attrs={tuple(k): v for k, v in job["attrs"]})
    k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    out.append([job["kernel"], job["arch"], aot._cubin_report(k.asm["cubin"], k.metadata.name, job["arch"]),
                aot._ptxas_report(k.asm["ptx"], job["arch"])])
asked = []
real = aot._ptxas_report
aot._ptxas_report = lambda ptx, arch: asked.append(arch) or {**real(ptx, arch), "spill_bytes": 8}
aot._cubin_report = lambda cubin, name, arch: {"regs": 1, "frame_bytes": 64, "static_shared": 0}
rec = aot.run_job(jobs[0])
print(json.dumps({"out": out, "asked": asked, "fallback": rec}))
'''
    result = json.loads(_in_subprocess(code).strip().splitlines()[-1])
    assert len(result["out"]) >= 12  # six Triton kernels, two archs
    for kernel, arch, cubin, ptxas in result["out"]:
        assert cubin["regs"] == ptxas["regs"] and cubin["static_shared"] == ptxas["static_shared"], (kernel, arch)
        assert cubin["frame_bytes"] == 0 and ptxas["spill_bytes"] == 0, (kernel, arch)
    assert result["asked"] == [result["fallback"]["arch"]]
    assert result["fallback"]["ok"] and result["fallback"]["spill_bytes"] == 8
    assert result["fallback"]["regs"] > 1  # ptxas's count, not the frame-only cubin report's


def test_a_hung_tool_is_killed_with_its_workers():
    """The sweep runs under a limit that means "hung" (hours, not a speed bound), and past it the
    tool's whole process group goes, compiler workers included (they once outlived pytest by an hour)."""
    import subprocess
    import time

    from helpers import HUNG_S

    assert HUNG_S >= 3600
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print(p.pid, flush=True); time.sleep(600)")
    with pytest.raises(subprocess.TimeoutExpired):
        run_process_group([sys.executable, "-c", code], timeout=5)
    # Both the tool and its worker must be gone (a zombie shows as "[python] <defunct>", no args).
    for _ in range(50):
        alive = [line for line in _ps_lines() if "time.sleep(600)" in line]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, alive


def _ps_lines():
    out = run_process_group(["ps", "-eo", "pid,stat,args"], timeout=60)
    return [line for line in out.stdout.splitlines() if "python" in line]


def test_specialization_matches_tritons_own():
    """aot.specialize (written out, so the sweep runs on Triton 3.3-3.9) gives what Triton's JIT
    gives for every argument of every launch in the default sweep, where Triton exposes its rule."""
    code = r'''
import json
import lorakern.aot as aot
try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
except ImportError:
    print(json.dumps({"skip": True}))
    raise SystemExit
n, differ = 0, []
for spec in aot._shape_specs(False):
    for role, cands in aot.record(spec):
        for kernel, _c, _g, kw in cands:
            for p in kernel.params:
                if not p.is_constexpr:
                    kind, key = native_specialize_impl(CUDABackend, kw[p.name], False, True, True)
                    n += 1
                    if (kind, key or None) != aot.specialize(kw[p.name]):
                        differ.append([p.name, kind, str(key)])
print(json.dumps({"n": n, "differ": differ[:10]}))
'''
    result = json.loads(_in_subprocess(code).strip().splitlines()[-1])
    if result.get("skip"):
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    assert result["n"] > 10000 and result["differ"] == []
