"""CPU: the emulated kernels (tests/emulation/) built with -fsanitize=address,undefined and with
-fsanitize=thread, running tests/emulation/sanitize_driver.cpp: every kernel on odd shapes,
all dtypes, the split paths and the empty cases. AddressSanitizer reports any read or write
outside the exactly-sized buffers (e.g. the weight-sharing scale kernel with T = 0 used to read
past its empty inputs), UndefinedBehaviorSanitizer any overflow or misaligned access, and
ThreadSanitizer any pair of the block's threads touching shared memory without a barrier
between them (the emulation runs a block's threads as real threads; blocks run one at a time,
so races between blocks and the GPU memory model are out of its reach)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "emulation"))

from build import compile_emulation  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the kernel emulation")

REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer", "ERROR: LeakSanitizer")


@pytest.mark.parametrize("sanitize", ["address", "thread"])
def test_emulated_kernels_are_sanitizer_clean(sanitize):
    driver = compile_emulation(sanitize=sanitize, executable=True)
    env = dict(os.environ, ASAN_OPTIONS="halt_on_error=1:abort_on_error=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", TSAN_OPTIONS="halt_on_error=1")
    # ThreadSanitizer makes every emulated thread ~10x dearer: a quick set, one shape per path
    done = subprocess.run([str(driver), *(["--quick"] if sanitize == "thread" else [])], capture_output=True,
                          text=True, env=env, timeout=600)
    found = [r for r in REPORTS if r in done.stderr]
    assert done.returncode == 0 and not found, f"{sanitize}: rc={done.returncode} {found}\n{done.stderr[-6000:]}"
    assert "sanitize_driver: ok" in done.stdout
