#!/usr/bin/env bash
# Compile-checks every .cu file for sm_90 (H100/H200) with nvcc, without a GPU or a CUDA torch:
# the CPU wheel ships the ATen/c10 CUDA headers. Produces no binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found; set NVCC=/path/to/nvcc" >&2
  exit 1
fi
PY="${PYTHON:-.venv/bin/python}"
TORCH_INCLUDE="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
ABI="$("$PY" -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')"

mapfile -t sources < <(find cpp -name '*.cu' | sort)
echo "check_cuda_compile: ${#sources[@]} file(s), $("$NVCC" --version | tail -n 2 | head -n 1)"
check() {
  local source=$1 start=$SECONDS
  # C++20 as torch's CMake config forces for CUDA. The wheel lacks c10/cuda's generated CMake header: C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it.
  if "$NVCC" -std=c++20 -arch=sm_90 -c "$source" -o /dev/null \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
    --expt-relaxed-constexpr --expt-extended-lambda -Xcompiler -fPIC \
    -Icpp/include -Icpp/src -isystem "$TORCH_INCLUDE" -isystem "$TORCH_INCLUDE/torch/csrc/api/include"; then
    echo "  ok  $source ($((SECONDS - start)) s)"
  else
    echo "  FAILED  $source" >&2
    return 1
  fi
}
export -f check
export NVCC ABI TORCH_INCLUDE
# one nvcc per core (each takes ~1 GB); a failure fails the script once all have run
printf '%s\0' "${sources[@]}" | xargs -0 -n 1 -P "$(nproc)" bash -c 'check "$1"' check
