#!/usr/bin/env bash
# GPU verification (H100/H200, Python 3.12, torch 2.11+cu130, no network):
#   bash bench/gpu_check.sh OUTDIR
# Builds the extension in place for sm_90, runs every test (GPU tests included), the kernel
# table with the performance model beside it, the SASS facts, the optimizer/training step
# timings and the kernels under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).
# Every stage runs even if an earlier one failed; logs and JSON go to OUTDIR; the exit
# status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
status=0

stage() {  # stage NAME COMMAND...: run, tee to OUT/NAME.log, remember a failure
  local name=$1; shift
  echo "=== $name: $*" | tee "$OUT/$name.log"
  "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name exit $rc" | tee -a "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; \
  git rev-parse HEAD; } > "$OUT/env.log" 2>&1
stage build env KFAC_CUDA_ARCH_LIST=90 KFAC_CUDA_FORCE_BUILD=1 \
  python -m pip install --no-build-isolation --no-deps -v -e .
stage tests env KFAC_CUDA_REQUIRE_EXTENSION=1 python -m pytest -q -rs tests
stage kernel_table python bench/kernel_table.py "$OUT/kernel_table.json"
# the H100 performance model beside the measurement: the first GPU run calibrates it
stage kernel_model python bench/kernel_model.py --measured "$OUT/kernel_table.json"
stage kernel_sass python bench/kernel_sass.py --json "$OUT/kernel_sass.json"
stage step_time python bench/step_time.py "$OUT/step_time.json"
for tool in memcheck racecheck synccheck initcheck; do
  stage "sanitizer_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 python bench/sanitize_kernels.py
done
echo "gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED) (logs in $OUT)"
exit $status
