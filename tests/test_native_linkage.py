"""The native CPU sources are compiled with different instruction-set flags per file (setup.py's
CPU_SOURCES: the scalar file for any x86-64, one file with AVX2, one with AVX-512). A function that
two of them define with external linkage (an ``inline`` function in a shared header, a member
function defined in a class) is merged at link time into one copy, whichever file's it is, and the
others call it: an AVX-512 copy in the AVX2 path, or an AVX copy in the scalar path, stops the
process on a CPU without those instructions. Each file is compiled here as setup.py compiles it
(-O3, its own flags): no weak symbol of lorakern's may be defined by two files of different flags
(block_scale was, once its caller grew past the inliner's budget)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cpu_sources() -> list[tuple[str, list[str]]]:
    """setup.py's CPU_SOURCES on this machine (its x86 additions included where it adds them)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "CPU_SOURCES" for t in targets):
                out += ast.literal_eval(node.value)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nm and the g++ / clang++ command line")
def test_no_function_is_shared_between_the_isa_files(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    nm = shutil.which("nm")
    if cxx is None or nm is None:
        pytest.skip("no C++ compiler or nm")
    pybind11 = pytest.importorskip("pybind11")
    sources = cpu_sources()
    assert any("avx2" in src for src, _ in sources) or "x86" not in os.uname().machine
    includes = [f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    def compile_and_list(item):
        src, flags = item
        obj = tmp_path / (Path(src).stem + ".o")
        cmd = [cxx, "-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-DLORAKERN_X86",
               *includes, *flags, "-c", str(ROOT / src), "-o", str(obj)]
        subprocess.run(cmd, check=True, capture_output=True)
        return flags, subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True,
                                     check=True).stdout

    shared = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for flags, symbols in pool.map(compile_and_list, sources):
            for line in symbols.splitlines():
                m = re.match(r"\S+ [WVu] (lorakern::.*)$", line)
                if m:
                    shared.setdefault(m.group(1), set()).add(" ".join(flags))
    shared = {name: sorted(f) for name, f in shared.items() if len(f) > 1}
    assert not shared, "functions with external linkage defined by files of different ISA flags (make them " \
                       f"static or put them in an anonymous namespace): {shared}"
