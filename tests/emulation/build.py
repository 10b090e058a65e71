"""Build the CPU emulation of the kernels in csrc/ (tests only; no GPU, no nvcc needed).

The kernel sources are compiled unchanged by g++ against the shim headers in cuda_shim/
(blocks run one after another, each block's threads as real threads with a barrier for
__syncthreads); the only rewrite is the launch syntax ``kernel<<<grid, block, smem,
stream>>>(args);`` -> ``emu::launch(grid, block, smem, stream, [&] { kernel(args); });``.
This checks indexing, bounds, tiling, split reductions and epilogues of the real code
against the PyTorch references on the CPU machine. It cannot check anything about the GPU
itself (memory model, occupancy, speed): that needs the GPU tests in tests/gpu/.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
KERNELS = ["precondition.cu", "scale_accumulate.cu", "conv_factor_accumulate.cu", "factor_accumulate.cu"]
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def rewrite_launches(source: str) -> str:
    return _LAUNCH.sub(lambda m: f"::emu::launch({m.group(2)}, [&]() {{ {m.group(1)}({m.group(3)}); }});", source)


#: Sanitizer builds (compile_emulation(sanitize=...)): the extra g++ flags.
SANITIZERS = {
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}


def compile_emulation(sanitize: Optional[str] = None, executable: bool = False,
                      out_dir: Optional[Path] = None) -> Path:
    """Compile (cached by source hash and flags) the emulated kernels with harness.cpp.

    Default: the shared library the ctypes front end loads. ``executable=True`` links
    sanitize_driver.cpp instead, a stand-alone program that runs every kernel on odd shapes
    and split paths. ``sanitize``: None, "address" (AddressSanitizer + UndefinedBehaviorSanitizer)
    or "thread" (ThreadSanitizer). Sanitized code runs as the stand-alone driver, since the
    runtimes cannot be loaded into an uninstrumented Python reliably (TSan cannot at all)."""
    if sanitize is not None and sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {sorted(SANITIZERS)}, got {sanitize!r}")
    flags = SANITIZERS.get(sanitize, [])
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++) found")
    sources = {name: (CSRC / name).read_text() for name in KERNELS}
    digest = hashlib.sha256()
    for path in sorted([*CSRC.glob("*.h"), *CSRC.glob("*.cuh"), *(CSRC / n for n in KERNELS),
                        *HERE.glob("cuda_shim/*.h"), *HERE.glob("*.cpp"), Path(__file__)]):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join([*flags, str(executable)]).encode())
    out_dir = out_dir or Path(tempfile.gettempdir()) / f"kfac_emulation_{digest.hexdigest()[:16]}"
    target = out_dir / ("sanitize_driver" if executable else "libkfac_emulation.so")
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    cpp_files = []
    for name, text in sources.items():
        rewritten = rewrite_launches(text)
        if "<<<" in rewritten:
            raise RuntimeError(f"{name}: a launch was not rewritten")
        emu_cpp = out_dir / (name[:-3] + "_emu.cpp")
        emu_cpp.write_text(rewritten)
        cpp_files.append(str(emu_cpp))
    cpp_files.append(str(HERE / "harness.cpp"))
    if executable:
        cpp_files.append(str(HERE / "sanitize_driver.cpp"))
    tmp = out_dir / f"{target.name}.{os.getpid()}.tmp"
    cmd = [cxx, "-std=c++20", "-O2", "-g", "-pthread", "-Wall", "-Wno-unknown-pragmas", *flags,
           *([] if executable else ["-fPIC", "-shared"]),
           f"-I{HERE / 'cuda_shim'}", f"-I{CSRC}", *cpp_files, "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulation build failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
    os.replace(tmp, target)
    return target


def build(out_dir: Optional[Path] = None) -> ctypes.CDLL:
    """Compile (cached) and load the emulation library."""
    return ctypes.CDLL(str(compile_emulation(out_dir=out_dir)))
