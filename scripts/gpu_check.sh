#!/usr/bin/env bash
# One command for a GPU machine (H100/H200, its own torch, no network): builds for sm_90 only,
# runs the CUDA tests, runs the GPU benchmark, prints a short table last; about 5 minutes.
# Uses the machine's python and torch (not .venv); installs into build/gpu_site (PYTHONPATH), not
# into that python's environment, which may be read-only.
# Full logs go to $OUT when it is set, else to build/gpu_check. SANITIZE=1 adds
# compute-sanitizer's memcheck and racecheck over BatchNorm's kernels (a few minutes more).
# MATTERHORN_CMAKE_ARGS: more pip -C options (e.g. a partial CUDA toolkit's hints, README "CUDA builds").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
OUT_DIR="${OUT:-build/gpu_check}"
mkdir -p "$OUT_DIR"

start=$SECONDS
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
SITE="$PWD/build/gpu_site"
rm -rf "$SITE"
timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-compile --target "$SITE" . \
  -C cmake.define.MATTERHORN_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" -C cmake.define.MATTERHORN_BUILD_TOOLS=OFF \
  -C build-dir=build/gpu ${MATTERHORN_CMAKE_ARGS:-} > "$OUT_DIR/build.txt" 2>&1 \
  || { tail -n 40 "$OUT_DIR/build.txt"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import matterhorn_pytorch as m; print("gpu_check: using", m.__file__)'
echo "gpu_check: built in $((SECONDS - start)) s"
# every test, not -x: one run should show every failure
# a failure still lets the benchmark run and print its table, then fails the script
tests_status=0
timeout 240 "$PY" -m pytest -q -rf tests/test_cuda.py > "$OUT_DIR/cuda_tests.txt" 2>&1 || tests_status=$?
tail -n 25 "$OUT_DIR/cuda_tests.txt"
# spike_input on CUDA: the layers, the pack / unpack kernels, opcheck (the "cuda" cases of the file)
timeout 180 "$PY" -m pytest -q -rf tests/test_spike_input.py -k cuda > "$OUT_DIR/spike_tests.txt" 2>&1 || tests_status=$?
tail -n 5 "$OUT_DIR/spike_tests.txt"
if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -m pytest -q -x tests/test_cuda.py \
      -k "write_every_element or per_step_batch_norm_2d" > "$OUT_DIR/$tool.txt" 2>&1 \
      && echo "gpu_check: $tool clean" || { tests_status=1; echo "gpu_check: $tool found something:"; tail -n 15 "$OUT_DIR/$tool.txt"; }
  done
fi
timeout 240 "$PY" bench/bench_gpu.py 2>&1 | tee "$OUT_DIR/bench_gpu.txt"
echo "gpu_check: done in $((SECONDS - start)) s"
if [ "$tests_status" != 0 ]; then
  echo "gpu_check: FAILED: the CUDA tests (exit status $tests_status), see $OUT_DIR/cuda_tests.txt"
  exit 1
fi
