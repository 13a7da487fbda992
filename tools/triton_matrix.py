"""Verify lorakern on every Triton of the supported range: for each version, a venv beside the
installed CPU torch, the default AOT sweep for sm_80 / sm_90 and the interpreter kernel tests, one
JSON and one markdown summary.

    python tools/triton_matrix.py 3.3.1 3.5.0 3.6.0 3.7.1 3.9.0 --out benchmarks/results/triton-matrix

Each venv (``--venvs``, default /tmp/lorakern-triton-<version>) uses the system's site-packages
(torch, numpy, pytest, this checkout) with only triton (and numpy < 2.4, which the interpreters
before 3.7 need) installed into it. About 10 minutes a version on two cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from lorakern.aot import TRITON_OF_TORCH

ROOT = Path(__file__).resolve().parents[1]


def torch_pin(triton_version: str) -> str:
    """The torch releases whose CUDA builds pin this Triton ("-" for none)."""
    return ", ".join(t for t, v in TRITON_OF_TORCH.items() if v == triton_version) or "-"


def run(cmd, env=None, log=None) -> tuple[int, str, float]:
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    text = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(text)
    return proc.returncode, text, time.time() - t0


def venv_for(version: str, root: Path) -> Path:
    venv = root / f"lorakern-triton-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"triton=={version}", "numpy<2.4"], check=True)
    return python


def check(version: str, python: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    aot_json = out / f"aot-{version}.json"
    rc, text, secs = run([str(python), "-m", "lorakern.aot", "--arch", "80,90", "--no-cuda", "--json", str(aot_json)],
                         env, out / f"aot-{version}.log")
    recs = json.loads(aot_json.read_text()) if aot_json.exists() else []
    failing = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} r={r['ranks']} {r['config']}: {'; '.join(r['violations'])}"
               for r in recs if r["violations"]]
    ok = [r for r in recs if r["ok"]]
    result = {
        "triton": version, "torch_pin": torch_pin(version), "aot_rc": rc, "aot_seconds": round(secs),
        "compiles": len(recs), "failing": failing,
        "spills": sum(1 for r in recs if r.get("spill_bytes")),
        "max_regs": max((r["regs"] for r in ok), default=None),
        "max_shared": max((r["shared_bytes"] for r in ok), default=None),
        "wgmma": sum(1 for r in ok if r.get("mma") == "wgmma"),
    }
    env = {**env, "TRITON_INTERPRET": "1"}
    tests = ["tests/test_triton_kernels.py", "tests/test_dora.py", "tests/test_multi.py", "tests/test_int4.py", "-k",
             "not (test_dora or test_multi or test_int4) or triton"]
    rc, text, secs = run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env,
                         out / f"interpreter-{version}.log")
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text.splitlines()[-1]))
    result.update(interpreter_rc=rc, interpreter=counts, interpreter_seconds=round(secs))
    return result


def markdown(results, meta) -> str:
    lines = [f"Triton versions checked on {meta['date']} ({meta['machine']}, torch {meta['torch']} CPU, "
             f"commit {meta['commit']}): `python tools/triton_matrix.py {' '.join(r['triton'] for r in results)}`", "",
             "| triton | pinned by CUDA torch | AOT sm_80/sm_90 compiles | failing | spills | max regs | "
             "max shared | wgmma tiles | interpreter tests |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        it = r["interpreter"]
        tests = f"{it.get('passed', 0)} passed, {it.get('failed', 0) + it.get('error', 0)} failed"
        lines.append(f"| {r['triton']} | {r['torch_pin']} | {r['compiles']} | {len(r['failing'])} | {r['spills']} | "
                     f"{r['max_regs']} | {r['max_shared']} | {r['wgmma']} | {tests} |")
    for r in results:
        for f in r["failing"]:
            lines.append(f"- {r['triton']}: {f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+")
    parser.add_argument("--out", default="triton-matrix")
    parser.add_argument("--venvs", default="/tmp")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip()}
    results = []
    for version in args.versions:
        print(f"triton {version}: venv", flush=True)
        result = check(version, venv_for(version, Path(args.venvs)), out)
        print(f"triton {version}: {result['compiles']} compiles, {len(result['failing'])} failing, "
              f"interpreter {result['interpreter']}", flush=True)
        results.append(result)
        # Written after each version, so a long run cut short keeps what it checked.
        (out / "summary.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        (out / "summary.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0 if all(not r["failing"] and r["aot_rc"] == 0 and r["interpreter_rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
