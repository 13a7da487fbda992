"""The native CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: lorakern._C built
with both (``LORAKERN_SANITIZE=1``) into a scratch copy of the package, and the tests that call it
run against that copy. A read or write outside a tensor (a stride, a tail, an empty input) or
undefined behaviour (an overflowing shift, a misaligned load) ends the run with the sanitizer's
report, where the plain build might return a plausible wrong number."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every test file that calls the CPU kernels (the Triton ones excluded: they never reach _C).
NATIVE_TESTS = ["test_nf4_native.py", "test_nf4_bf16.py", "test_int4.py", "test_multi.py", "test_qlora.py",
                "test_dropout.py", "test_dora.py"]


def _runtime(cxx: str, name: str) -> str | None:
    out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sanitizer runtimes are preloaded on Linux")
def test_native_kernels_under_asan_and_ubsan(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    runtimes = [_runtime(cxx, lib) for lib in ("libasan.so", "libubsan.so")] if cxx else [None]
    if None in runtimes:
        pytest.skip("no C++ compiler with the ASan and UBSan runtimes")
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "lorakern", pkg / "lorakern", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {**os.environ, "LORAKERN_SANITIZE": "1", "LORAKERN_CUDA": "0", "LORAKERN_REQUIRE_NATIVE": "1"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(pkg), "--build-temp",
                            str(tmp_path / "build")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (so,) = (pkg / "lorakern").glob("_C*.so")
    assert b"__asan_init" in so.read_bytes(), "the extension was built without AddressSanitizer"

    env = {**os.environ, "PYTHONPATH": str(pkg), "LD_PRELOAD": " ".join(runtimes),
           "ASAN_OPTIONS": f"detect_leaks=0:log_path={tmp_path / 'asan'}",
           "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={tmp_path / 'ubsan'}"}
    # Run from outside the checkout, so that its own lorakern is not first on the path.
    probe = subprocess.run([sys.executable, "-c", "import lorakern._C as c; print(c.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == str(so), probe.stdout + probe.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not triton",
                          *(str(ROOT / "tests" / t) for t in NATIVE_TESTS)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    reports = "".join(p.read_text()[:4000] for p in sorted(tmp_path.glob("*san.*")))  # log_path's files
    assert run.returncode == 0 and not reports, reports + run.stdout[-4000:] + run.stderr[-4000:]
    assert " passed" in run.stdout
