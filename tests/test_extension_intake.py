"""Malformed DLPack capsules and out-of-range sizes must raise a Python exception naming the
argument, never crash the process (a NULL shape pointer, an absurd ndim, negative sizes or
sizes whose product overflows used to be read unchecked).

Each malformed call runs in a subprocess, so that a regression shows as a failed test instead
of killing the test session. Runs without a GPU (tests/dlpack_fake.py).
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kfac_cuda import cuda_extension_available, cuda_extension_error

pytestmark = pytest.mark.skipif(not cuda_extension_available(),
                                reason=f"CUDA extension unavailable: {cuda_extension_error()}")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def run_isolated(body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import sys
        sys.path[:0] = [{tests!r}, {root!r}]
        from dlpack_fake import FakeCudaTensor as F
        from kfac_cuda._extension import extension
        ext = extension()
        try:
            {body}
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
        else:
            print("no error")
    """).format(tests=str(TESTS), root=str(ROOT), body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("fake, match", [
    ("F([4, 4], null_shape=True)", "A: malformed DLPack tensor: 2 dimensions but no shape"),
    ("F([4, 4], ndim=2**30)", r"A: malformed DLPack tensor: ndim 1073741824 outside \[0, 64\]"),
    ("F([4, 4], ndim=-1)", r"A: malformed DLPack tensor: ndim -1 outside"),
    ("F([-4, 4])", "A: malformed DLPack tensor: size -4 of dimension 0 is negative"),
    ("F([2**40, 2**40])", "A: malformed DLPack tensor: more than 2\\^48 elements"),
])
def test_malformed_capsule_raises_value_error(fake, match):
    proc = run_isolated(f"A = {fake}\n    ext.factor_accumulate(A, F([5, 3]), None, True, None, 1, 0.0, 1.0, 0)\n"
                        "    assert A.deleted == 1")
    assert proc.returncode == 0, f"crashed with {proc.returncode}: {proc.stderr[-2000:]}"
    import re
    assert re.match("ValueError: " + match, proc.stdout), proc.stdout + proc.stderr


@pytest.mark.parametrize("d_out, d_in", [(-1, 4), (4, -1), (0, 4), (2**40, 4), (4, 2**40)])
def test_scale_accumulate_tiles_refuses_sizes_out_of_range(d_out, d_in):
    from kfac_cuda._extension import extension
    with pytest.raises(ValueError, match="^d_out, d_in: expected 1 <= d_out, d_in <"):
        extension().scale_accumulate_tiles(d_out, d_in)
