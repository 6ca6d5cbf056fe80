#!/usr/bin/env bash
# Everything to check on a GPU machine, in as few device calls as possible (each call starts a
# bare machine: batch the work). Run from the repository root on the GPU machine:
#
#   bash benchmarks/gpu_checks.sh build tests     # compile, then every CUDA test (~minutes)
#   bash benchmarks/gpu_checks.sh bench           # gradkern bench --device cuda + pytest-benchmark
#   bash benchmarks/gpu_checks.sh monitor         # the Monitor's cost on a GPU step, two ways
#   bash benchmarks/gpu_checks.sh suite           # the whole test suite, not only the GPU files
#
# Logs and JSON go to $OUT when set (the device tool's output folder), else benchmarks/results/.
# Tests run from outside the checkout so that the installed build, not the gradkern/ source
# folder, is imported.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$repo/benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

for step in "$@"; do
  case "$step" in
    build)
      python -m pip install --no-build-isolation --no-deps -q "$repo" 2>&1 | tail -20
      (cd /tmp && gradkern info) 2>&1 | tee "$out/gpu-info.log" || status=1
      ;;
    tests)
      (cd /tmp && GRADKERN_REQUIRE=cpp,numba,numba_cuda,cuda python -m pytest -q -rfEs \
        -p no:cacheprovider "$repo/tests/test_cuda.py" "$repo/tests/test_backends.py" \
        "$repo/tests/test_distributed.py") 2>&1 | tee "$out/gpu-tests.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    bench)
      (cd /tmp && gradkern bench --device cuda --json "$out/gpu-bench.json") 2>&1 |
        tee "$out/gpu-bench.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      (cd /tmp && python -m pytest "$repo/benchmarks" --benchmark-only --gk-device cuda -q \
        -p no:cacheprovider --benchmark-json "$out/gpu-pytest-benchmark.json") 2>&1 |
        tail -60 > "$out/gpu-pytest-benchmark.log" || status=1
      ;;
    monitor)
      # host time inside the hooks (kernels aside), then the whole step of a ~100M model
      (cd /tmp && python "$repo/benchmarks/monitor_host_cost.py" --device cuda \
        --json "$out/gpu-monitor-host-cost.json") 2>&1 | tee "$out/gpu-monitor-host-cost.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      # batch 16 leaves the step host-bound, batch 64 makes it GPU-bound
      for batch in 16 64; do
        (cd /tmp && python "$repo/benchmarks/gpu_monitor_overhead.py" --batch $batch \
          --json "$out/gpu-monitor-overhead-b$batch.json") 2>&1 | tee "$out/gpu-monitor-overhead-b$batch.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      done
      ;;
    suite)
      (cd /tmp && GRADKERN_REQUIRE=cpp,numba,cuda python -m pytest -q -rfEs -p no:cacheprovider \
        "$repo/tests") 2>&1 | tail -40 | tee "$out/gpu-suite.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    *)
      echo "unknown step $step (build, tests, bench, monitor, suite)" >&2
      exit 2
      ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee "$out/gpu-device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu-device.txt"
exit $status
