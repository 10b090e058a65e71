"""Build script: compiles the CUDA extension ``kfac_cuda._C`` by driving CMake + Ninja.

Environment variables:
    KFAC_CUDA_ARCH_LIST   CUDA architectures, e.g. "90" or "80;90;90-virtual" (also accepts
                          ",", spaces, "sm_90", "9.0" and "9.0+PTX"). Default: SASS for sm_80
                          and sm_90 plus sm_90 PTX, which newer GPUs JIT-compile.
    MAX_JOBS              maximum number of parallel compile jobs.
    KFAC_CUDA_FORCE_BUILD =1 makes a missing nvcc or a failed compile an error; otherwise the
                          package installs as pure Python (every op then uses its PyTorch
                          reference) and ``kfac_cuda.cuda_extension_error()`` says why.
    CUDA_HOME / CUDA_PATH where to look for nvcc first (then PATH, then /usr/local/cuda).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80-real;90-real;90-virtual"


def _force_build() -> bool:
    return os.environ.get("KFAC_CUDA_FORCE_BUILD", "0").lower() in ("1", "true", "yes", "on")


def find_nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin, else None."""
    candidates = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    on_path = shutil.which("nvcc")
    candidates += [Path(on_path)] if on_path else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def cuda_architectures(spec: str) -> list[str]:
    """Turn a user arch list into CMake CUDA_ARCHITECTURES entries ("90", "90-real", "90-virtual")."""
    archs = []
    for item in filter(None, re.split(r"[;,\s]+", spec.strip())):
        ptx = item.endswith("+PTX")
        item = item.removesuffix("+PTX").removeprefix("sm_").removeprefix("compute_")
        match = re.fullmatch(r"(\d+)\.?(\d*)([a-z]?)(-real|-virtual)?", item)
        if not match:
            raise ValueError(f"KFAC_CUDA_ARCH_LIST: cannot parse architecture {item!r} in {spec!r}")
        major, minor, suffix, kind = match.groups()
        number = f"{major}{minor}{suffix}"
        archs += [f"{number}-real", f"{number}-virtual"] if ptx else [number + (kind or "")]
    if not archs:
        raise ValueError(f"KFAC_CUDA_ARCH_LIST is empty: {spec!r}")
    return archs


def _cached_cmake(build_dir: Path) -> str | None:
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return None
    found = re.search(r"^CMAKE_COMMAND:INTERNAL=(.*)$", cache.read_text(errors="replace"), re.M)
    return found.group(1) if found else None


class CMakeExtension(Extension):
    """An extension whose sources are built by the CMakeLists.txt in the project root."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build with CMake + Ninja in a fixed build dir (fast rebuilds)."""

    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
                built.append(ext)
            except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
                if _force_build():
                    raise
                message = (f"kfac_cuda: building the CUDA extension failed ({exc}); installing the "
                           "pure-Python package (set KFAC_CUDA_FORCE_BUILD=1 to make this an error)")
                warnings.warn(message)
                print(f"WARNING: {message}", file=sys.stderr)
        self.extensions = built

    def build_extension(self, ext: Extension) -> None:
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
        if cmake is None or ninja is None:
            raise RuntimeError("cmake and ninja are required on PATH (pip install cmake ninja)")
        import pybind11

        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        if _cached_cmake(build_dir) not in (None, cmake):  # a previous isolated build's cmake
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        archs = cuda_architectures(os.environ.get("KFAC_CUDA_ARCH_LIST", DEFAULT_ARCHS))
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            "-DCMAKE_BUILD_TYPE=Release",
            # ";" would split the list inside a -D definition: CMakeLists.txt turns "," back.
            f"-DKFAC_CUDA_ARCHS={','.join(archs)}",
            f"-DKFAC_CUDA_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        build = [cmake, "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", str(int(os.environ["MAX_JOBS"]))]
        print(f"kfac_cuda: building the CUDA extension for {';'.join(archs)} with {nvcc}", flush=True)
        subprocess.run(configure, check=True)
        subprocess.run(build, check=True)


setup(ext_modules=[CMakeExtension("kfac_cuda._C")], cmdclass={"build_ext": CMakeBuild})
