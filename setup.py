"""Build script: the pure-Python package plus the native extension ``lorakern._C``, built with ninja.

``lorakern._C`` holds the NF4 CPU kernels (always: AVX-512, AVX2 and plain C++ paths in one
binary, chosen at run time) and, when nvcc is found, the CUDA kernels. The sources include no
torch headers, so the build needs only a C++17 compiler, pybind11 and ninja (and nvcc for CUDA).

Environment:
    LORAKERN_CUDA=0|1          skip / require the CUDA backend (default: build it when nvcc is found,
                               and fall back to a CPU-only extension if that compile fails)
    LORAKERN_CUDA_ARCHS        e.g. "80;90a" (default), semicolon-separated compute capabilities
    LORAKERN_REQUIRE_NATIVE=1  fail the install if the extension does not build (default: warn and
                               install the pure-Python package, which falls back to torch)
    LORAKERN_SANITIZE=1        build the CPU code with AddressSanitizer and UBSan (for testing)
    MAX_JOBS                   ninja's parallelism
    CXX, CUDA_HOME             the compilers
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")

# Per-file ISA flags: only these two files may use AVX2 / AVX-512 instructions; everything else is
# built for the baseline ISA so the binary imports on any x86-64 and dispatches at run time.
CPU_SOURCES = [("csrc/bindings.cpp", []), ("csrc/cpu/nf4_scalar.cpp", []), ("csrc/cpu/nf4_dispatch.cpp", []),
               ("csrc/cpu/thread_pool.cpp", []), ("csrc/cpu/dropout_cpu.cpp", []),
               ("csrc/cpu/huge_pages.cpp", [])]
if X86:
    CPU_SOURCES += [
        ("csrc/cpu/nf4_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]),
        # gcc 12's avx512fintrin.h self-initialises "undefined" vectors (__Y = __Y): a known false
        # -W(maybe-)uninitialized inside the intrinsics, not in our code.
        ("csrc/cpu/nf4_avx512.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c",
                                     "-Wno-maybe-uninitialized", "-Wno-uninitialized"]),
    ]
CUDA_SOURCES = ["csrc/cuda/nf4_cuda.cu"]


def find_cuda() -> tuple[str, Path] | None:
    """(nvcc, CUDA home holding include/cuda_runtime.h and the static cudart), or None."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    which = shutil.which("nvcc")
    if which:
        homes.append(str(Path(which).resolve().parent.parent))
    for home in filter(None, homes):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return str(nvcc), Path(home)
    return None


def cudart_dir(home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (home / sub / "libcudart_static.a").is_file():
            return home / sub
    raise RuntimeError(f"libcudart_static.a not found under {home}")


def cuda_archs() -> list[str]:
    return [a.strip() for a in os.environ.get("LORAKERN_CUDA_ARCHS", "80;90a").split(";") if a.strip()]


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX for the newest listed arch (without the arch-specific "a"), so newer GPUs can JIT it.
    newest = archs[-1].rstrip("a")
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def quote(args: list[str]) -> str:
    return " ".join(a.replace(" ", "$ ") for a in args)


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for the extension and runs ninja on it."""

    def copy_extensions_to_source(self) -> None:
        # An extension that failed to build (and was allowed to) has nothing to copy.
        self.extensions = [e for e in self.extensions if Path(self.get_ext_fullpath(e.name)).exists()
                           or Path(self.build_lib, self.get_ext_filename(e.name)).exists()]
        super().copy_extensions_to_source()

    def build_extension(self, ext: Extension) -> None:
        try:
            self._build(ext, with_cuda=os.environ.get("LORAKERN_CUDA") != "0")
            return
        except Exception as exc:  # noqa: BLE001 - a missing compiler must not break the install
            first = exc
        if os.environ.get("LORAKERN_CUDA") != "1" and os.environ.get("LORAKERN_REQUIRE_NATIVE") != "1":
            try:  # a CUDA toolchain that fails must not cost the CPU kernels
                self._build(ext, with_cuda=False)
                warnings.warn(f"lorakern: built without the CUDA kernels ({first})", stacklevel=1)
                return
            except Exception as exc:  # noqa: BLE001
                first = exc
        if os.environ.get("LORAKERN_REQUIRE_NATIVE") == "1" or os.environ.get("LORAKERN_CUDA") == "1":
            raise first
        warnings.warn(f"lorakern: the native extension was not built ({first}); "
                      "the package will use its pure-torch NF4 path", stacklevel=1)

    def _build(self, ext: Extension, with_cuda: bool) -> None:
        import pybind11

        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg

                ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
            except ImportError as exc:
                raise RuntimeError("ninja is not installed (pip install ninja)") from exc
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX)")

        build_dir = Path(self.build_temp).resolve() / "lorakern_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)

        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
        # -ffp-contract=off: the decode must round code * absmax exactly once, as the reference does.
        cflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wextra",
                  "-pthread"]
        if X86:
            cflags.append("-DLORAKERN_X86")
        ldflags = ["-shared", "-pthread"]
        if os.environ.get("LORAKERN_SANITIZE") == "1":  # tests/test_sanitizers.py: ASan + UBSan builds
            cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
            ldflags.append("-fsanitize=address,undefined")

        cuda = find_cuda() if with_cuda else None
        if os.environ.get("LORAKERN_CUDA") == "1" and cuda is None:
            raise RuntimeError("LORAKERN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        nvcc = None
        if cuda:
            nvcc, cuda_home = cuda
            cflags.append("-DLORAKERN_WITH_CUDA")
            # The static cudart: no libcudart.so needed at import; it loads the driver on first use.
            ldflags += [f"-L{cudart_dir(cuda_home)}", "-lcudart_static", "-ldl", "-lpthread", "-lrt"]

        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {quote(includes + cflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags $isa -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            f"  command = $cxx $in -o $out {quote(ldflags)}",
        ]
        objects = []
        for src, isa in CPU_SOURCES:
            obj = build_dir / (Path(src).stem + ".o")
            lines += [f"build {obj}: cxx {ROOT / src}", f"  isa = {quote(isa)}"]
            objects.append(str(obj))
        if nvcc:
            nvflags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{CSRC}", "-Xptxas", "-warn-spills",
                       "-Xptxas", "-warn-lmem-usage", *gencode_flags(cuda_archs())]
            lines += [f"nvcc = {nvcc}", f"nvflags = {quote(nvflags)}", "rule nvcc",
                      "  command = $nvcc $nvflags -c $in -o $out"]
            for src in CUDA_SOURCES:
                obj = build_dir / (Path(src).stem + ".cu.o")
                lines.append(f"build {obj}: nvcc {ROOT / src}")
                objects.append(str(obj))
        lines.append(f"build {out}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS")
        cmd = [ninja, "-C", str(build_dir)] + (["-j", jobs] if jobs else [])
        print(f"lorakern: building {out.name} with ninja ({'CUDA ' + ','.join(cuda_archs()) if nvcc else 'CPU only'})",
              file=sys.stderr)
        subprocess.run(cmd, check=True)


setup(
    ext_modules=[Extension("lorakern._C", sources=[s for s, _ in CPU_SOURCES])],
    cmdclass={"build_ext": NinjaBuildExt},
)
