"""CPU: static gates on the SASS of the compiled extension (sm_90 cubins), read with cuobjdump
(bench/kernel_sass.py; PyPI nvidia-cuda-cuobjdump + nvidia-cuda-nvdisasm). Skipped when the
extension is not built or cuobjdump is missing; CI installs both (.ci/run).

Gates: no register spills or stack frames anywhere; a register budget per kernel (the
occupancy its launch shape was designed for); tensor-core kernels have HMMA in their hot loop
and load their fragments from shared memory (16-bit ones with LDSM, i.e. ldmatrix), and no
kernel uses generic-address LD.E/ST.E (shared memory
must be addressed as shared, global as global); the hot loop of each kernel keeps at least
its recorded compute fraction (static math / instructions: a regression floor, printed by
``python bench/kernel_sass.py``)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import kernel_sass  # noqa: E402

# kernel -> (max registers per thread, hot-loop compute fraction floor). Budgets: 65536
# registers per SM; factor_mma 128 threads x 96 -> 5 blocks (20 warps); factor_simt 256 x 48
# -> 5 blocks; gemm_tile users 256 x 64 -> 4 blocks; scale kernels 256 x 80 -> 3 blocks;
# tf32_gemm (precondition) 128 x 168 -> 3 blocks (12 warps; __launch_bounds__(128, 3)).
# scale_rows_tf32 128 x 96 -> 5 blocks; scale_shared_tf32 128 x 128 -> 4 blocks (its launch bound).
BUDGETS = {
    "factor_mma_kernel": (96, 0.04),
    "factor_tf32_kernel": (96, 0.075),
    "factor_simt_kernel": (48, 0.24),
    "tf32_gemm_kernel": (168, 0.25),
    "split_epilogue_kernel": (40, 0.0),
    "scale_rows_kernel": (80, 0.45),
    "scale_shared_kernel": (80, 0.45),
    "scale_rows_tf32_kernel": (96, 0.18),
    "scale_shared_tf32_kernel": (128, 0.17),
    "conv_factor_kernel": (64, 0.12),
    "conv_tf32_kernel": (128, 0.095),  # 128 threads x 128 -> 4 blocks (the conv split rule's slots)
    "conv_mma_kernel": (128, 0.028),
    "reduce_splits_kernel": (32, 0.0),
    "scale_kernel": (32, 0.0),
    "sum_partials_kernel": (32, 0.0),
}
# tensor-core kernel -> whether its fragments must come through ldmatrix (16-bit operands;
# tf32 fragments are 32-bit and load with LDS)
TENSOR_CORE_KERNELS = {"factor_mma_kernel": True, "factor_tf32_kernel": False, "tf32_gemm_kernel": False,
                       "scale_rows_tf32_kernel": False, "scale_shared_tf32_kernel": False,
                       "conv_mma_kernel": True, "conv_tf32_kernel": False}


@pytest.fixture(scope="module")
def kernels():
    so = kernel_sass.extension_path()
    if so is None:
        pytest.skip("kfac_cuda._C is not built")
    if kernel_sass.cuobjdump() is None:
        pytest.skip("cuobjdump/nvdisasm not installed (pip install --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    found = kernel_sass.analyse(so)
    if not found:
        pytest.skip("the extension holds no sm_90 cubin")
    return found


def base(kernel) -> str:
    return kernel.name.split("<")[0]


def test_every_kernel_has_a_budget(kernels):
    assert {base(k) for k in kernels} <= set(BUDGETS), {base(k) for k in kernels} - set(BUDGETS)


def test_no_spills_and_register_budget(kernels):
    for k in kernels:
        assert k.local == 0 and k.stack == 0, f"{k.name}: {k.local} B local / {k.stack} B stack (spills)"
        assert 0 < k.registers <= BUDGETS[base(k)][0], f"{k.name}: {k.registers} registers"


def test_tensor_core_kernels_use_hmma_and_shared_fragments(kernels):
    tc = [k for k in kernels if base(k) in TENSOR_CORE_KERNELS]
    assert {base(k) for k in tc} == set(TENSOR_CORE_KERNELS), "a tensor-core kernel is missing"
    for k in tc:
        loop = k.hot_loop
        assert loop is not None and loop.hmma > 0, f"{k.name}: no HMMA in the hot loop"
        assert loop.shared_loads > 0, f"{k.name}: fragments not loaded from shared memory"
        if TENSOR_CORE_KERNELS[base(k)]:
            assert k.ldmatrix > 0, f"{k.name}: no LDSM (ldmatrix)"


def test_no_generic_memory_access(kernels):
    for k in kernels:
        assert k.generic_memory == 0, f"{k.name}: {k.generic_memory} generic LD.E/ST.E"


def test_hot_loop_compute_fraction_floor(kernels):
    for k in kernels:
        floor = BUDGETS[base(k)][1]
        if floor:
            assert k.hot_loop is not None and k.hot_loop.compute_fraction >= floor, (k.name, k.hot_loop)


def test_short_name_is_not_fooled_by_the_namespace_hash():
    # nvcc's anonymous-namespace hash depends on the source path; this one (a build in another
    # checkout) ends in digits that, read as a length, frame "_19_scale_..._kernel".
    mangled = "_ZN4kfac52_GLOBAL__N__16377856_19_scale_accumulate_cu_a0aef49222scale_rows_tf32_kernelEPKfS2_PfS3_iiiiff"
    assert kernel_sass.short_name(mangled) == "scale_rows_tf32_kernel"
