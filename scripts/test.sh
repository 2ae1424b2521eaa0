#!/usr/bin/env bash
# Sets up everything on a fresh machine (see setup.sh), compile-checks the CUDA sources with
# nvcc for sm_90, then runs the whole test suite (Python, TorchScript, the C++ programs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check_cuda_compile.sh
exec .venv/bin/python -m pytest "$@"
