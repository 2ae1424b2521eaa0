#!/usr/bin/env bash
# Sets up everything on a fresh machine (see setup.sh), compile-checks the CUDA sources with
# nvcc for sm_90, then runs the whole test suite (Python, TorchScript, the C++ programs) in one pytest
# worker per core, at most 4 (most tests are small tensors, bound by one core's Python; each worker
# holds torch and compiled graphs, ~1 GB). MATTERHORN_TEST_WORKERS overrides; 0 runs in-process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check_cuda_compile.sh
workers="${MATTERHORN_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}"
exec .venv/bin/python -m pytest -n "$workers" "$@"
