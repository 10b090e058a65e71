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
KERNELS = ["precondition.cu", "scale_accumulate.cu", "conv_factor_accumulate.cu"]
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def rewrite_launches(source: str) -> str:
    return _LAUNCH.sub(lambda m: f"::emu::launch({m.group(2)}, [&]() {{ {m.group(1)}({m.group(3)}); }});", source)


def build(out_dir: Optional[Path] = None) -> ctypes.CDLL:
    """Compile (cached by source hash) and load the emulation library."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++) found")
    sources = {name: (CSRC / name).read_text() for name in KERNELS}
    digest = hashlib.sha256()
    for path in sorted([*CSRC.glob("*.h"), *CSRC.glob("*.cuh"), *(CSRC / n for n in KERNELS),
                        *HERE.glob("cuda_shim/*.h"), HERE / "harness.cpp", Path(__file__)]):
        digest.update(path.name.encode() + path.read_bytes())
    out_dir = out_dir or Path(tempfile.gettempdir()) / f"kfac_emulation_{digest.hexdigest()[:16]}"
    lib = out_dir / "libkfac_emulation.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        cpp_files = []
        for name, text in sources.items():
            rewritten = rewrite_launches(text)
            if "<<<" in rewritten:
                raise RuntimeError(f"{name}: a launch was not rewritten")
            target = out_dir / (name[:-3] + "_emu.cpp")
            target.write_text(rewritten)
            cpp_files.append(str(target))
        tmp = out_dir / f"lib.{os.getpid()}.so"
        cmd = [cxx, "-std=c++20", "-O2", "-g", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas",
               f"-I{HERE / 'cuda_shim'}", f"-I{CSRC}", *cpp_files, str(HERE / "harness.cpp"), "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))
