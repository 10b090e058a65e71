"""Static SASS facts of the compiled kernels (sm_90 cubins inside kfac_cuda/_C*.so), read with
cuobjdump (PyPI wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm; no GPU needed):
registers, stack and local memory (spills) per kernel, tensor-core and ldmatrix instructions,
generic (non-shared, non-global) loads and stores, and the instruction mix of each kernel's hot
loop. tests/test_sass_gates.py turns these into CI gates.

    python bench/kernel_sass.py [--so PATH] [--json OUT]

"Hot loop": among the loops of a kernel (a backward branch and its target), the one holding
the most math instructions (FFMA/FMUL/FADD/HMMA/...), smallest body on ties. Its "compute
fraction" is math / all instructions of the body, counted statically (a loop nested inside it,
such as a staging loop, is counted once): a regression metric, not an executed-instruction
profile.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

MATH = re.compile(r"^(FFMA|FMUL|FADD|FMNMX|HMMA|HFMA2|DFMA|DADD|DMUL|IMMA)\b")
GENERIC_MEMORY = re.compile(r"^(LD|ST)\.E\b")  # generic address space; LDG/LDS/STG/STS are explicit
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"^\s*(0x[0-9a-f]+|`?\(?\.L_x_\d+\)?`?)")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_KERNEL_NAME = re.compile(r"\d+(\w+?_kernel)")


def cuobjdump() -> Optional[str]:
    """Path of a cuobjdump that can disassemble (nvdisasm beside it or on PATH), else None."""
    candidates = [shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += [str(p) for p in Path(root).glob("cu*/bin/cuobjdump")]
    for tool in filter(None, candidates):
        if shutil.which("nvdisasm") or (Path(tool).parent / "nvdisasm").exists():
            return tool
    return None


def extension_path() -> Optional[Path]:
    spec = importlib.util.find_spec("kfac_cuda._C")
    return Path(spec.origin) if spec and spec.origin else None


def _run(tool: str, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(tool).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True, env=env).stdout


def short_name(mangled: str) -> str:
    """Readable label of a mangled kernel name: `factor_mma_kernel<bf16>`, `tf32_gemm_kernel<StoreScaled>`."""
    name = mangled
    for i in range(len(mangled)):  # Itanium mangling: <length><identifier>, after a hash's digits too
        digits = re.match(r"\d+", mangled[i:])
        ident = mangled[i + digits.end():i + digits.end() + int(digits.group())] if digits else ""
        # The kernel's own identifier starts with a letter; a hash's digits read as a length can
        # frame a longer one ending in _kernel that starts at the file tag ("_19_scale_...").
        if ident[:1].isalpha() and ident.endswith("_kernel"):
            name = ident
            break
    rest = mangled.split(name, 1)[-1]
    tags = [t for t in ("StorePlain", "StoreScaled", "StoreSplit") if t in rest]
    tags += (["bf16"] if "__nv_bfloat16" in rest else ["fp16"] if "6__half" in rest
             else ["fp32"] if rest.startswith("IfE") else [])
    if name == "reduce_splits_kernel":
        tags.append("symmetric" if rest.startswith("ILb1E") else "plain")
    return f"{name}<{','.join(tags)}>" if tags else name


@dataclass
class Instruction:
    address: int
    opcode: str
    operands: str


@dataclass
class HotLoop:
    start: int
    end: int
    instructions: int
    math: int
    hmma: int
    shared_loads: int
    global_loads: int
    compute_fraction: float


@dataclass
class Kernel:
    mangled: str
    name: str
    registers: int
    stack: int
    shared: int
    local: int
    hmma: int = 0
    ldmatrix: int = 0
    generic_memory: int = 0
    hot_loop: Optional[HotLoop] = None
    opcodes: Dict[str, int] = field(default_factory=dict)


def _parse_sass(text: str) -> Dict[str, List[Instruction]]:
    functions: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    for line in text.splitlines():
        if "Function :" in line:  # a template instantiated in several files appears once per cubin
            name = line.split("Function :", 1)[1].strip()
            current = None if name in functions else functions.setdefault(name, [])
            continue
        match = _INSTRUCTION.search(line)
        if match and current is not None:
            current.append(Instruction(int(match.group(1), 16), match.group(3), match.group(4)))
    return functions


def _loops(code: List[Instruction]) -> List[Tuple[int, int]]:
    labels = {}
    loops = []
    for ins in code:
        if ins.opcode != "BRA":
            continue
        target = _BRANCH_TARGET.match(ins.operands)
        if target and target.group(1).startswith("0x"):
            start = int(target.group(1), 16)
            if start <= ins.address:
                loops.append((start, ins.address))
        labels[ins.address] = target
    return loops


def _hot_loop(code: List[Instruction]) -> Optional[HotLoop]:
    best = None
    for start, end in _loops(code):
        body = [i for i in code if start <= i.address <= end]
        math = sum(bool(MATH.match(i.opcode)) for i in body)
        key = (math, -len(body))
        if math and (best is None or key > best[0]):
            best = (key, start, end, body, math)
    if best is None:
        return None
    _, start, end, body, math = best
    return HotLoop(start, end, len(body), math, sum(i.opcode.startswith("HMMA") for i in body),
                   sum(i.opcode.startswith(("LDS", "LDSM")) for i in body),
                   sum(i.opcode.startswith("LDG") for i in body), round(math / len(body), 4))


def analyse(so: Path, tool: Optional[str] = None) -> List[Kernel]:
    """One Kernel per function of the sm_90 cubins in ``so``."""
    tool = tool or cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump with nvdisasm not found (pip install --no-deps nvidia-cuda-cuobjdump "
                                "nvidia-cuda-nvdisasm)")
    resources: Dict[str, Tuple[int, ...]] = {}
    name = None
    for line in _run(tool, "-res-usage", "-arch", "sm_90", str(so)).splitlines():
        if "Function " in line:
            name = line.split("Function ", 1)[1].strip().rstrip(":")
        elif name and (m := _RESOURCES.search(line)):
            resources[name] = tuple(int(g) for g in m.groups())
    kernels = []
    for mangled, code in _parse_sass(_run(tool, "-sass", "-arch", "sm_90", str(so))).items():
        regs, stack, shared, local = resources.get(mangled, (-1, -1, -1, -1))
        opcodes: Dict[str, int] = {}
        for ins in code:
            opcodes[ins.opcode] = opcodes.get(ins.opcode, 0) + 1
        kernels.append(Kernel(mangled, short_name(mangled), regs, stack, shared, local,
                              hmma=sum(n for op, n in opcodes.items() if op.startswith("HMMA")),
                              ldmatrix=sum(n for op, n in opcodes.items() if op.startswith("LDSM")),
                              generic_memory=sum(n for op, n in opcodes.items() if GENERIC_MEMORY.match(op)),
                              hot_loop=_hot_loop(code), opcodes=opcodes))
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", type=Path, default=None, help="extension shared object (default: kfac_cuda._C)")
    parser.add_argument("--json", type=Path, default=None, help="write the facts as JSON here")
    args = parser.parse_args()
    so = args.so or extension_path()
    if so is None:
        raise SystemExit("kfac_cuda._C is not built")
    kernels = analyse(so)
    print(f"{'kernel':34} {'regs':>4} {'smem':>6} {'spill':>5} {'HMMA':>4} {'LDSM':>4} {'LD.E':>4} "
          f"{'loop instr':>10} {'math':>4} {'compute':>7}")
    for k in sorted(kernels, key=lambda k: k.name):
        loop = k.hot_loop
        print(f"{k.name:34} {k.registers:4} {k.shared:6} {k.local + k.stack:5} {k.hmma:4} {k.ldmatrix:4} "
              f"{k.generic_memory:4} {loop.instructions if loop else '-':>10} {loop.math if loop else '-':>4} "
              f"{loop.compute_fraction if loop else '-':>7}")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(k), "opcodes": None} for k in kernels], indent=1))


if __name__ == "__main__":
    main()
