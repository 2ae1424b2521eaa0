#!/usr/bin/env bash
# Idempotent setup on a fresh machine: a local venv (.venv), the pinned dependencies, and an
# editable build of this package (incremental: the CMake build dir under build/ is kept).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the inference server's HTTP library (Boost.Beast/Asio, header-only), and
# qemu-user, with which the tests run the library as on CPUs without AVX2 or AVX-512.
packages=()
[ -f /usr/include/boost/beast/http.hpp ] || packages+=(libboost-dev)
command -v qemu-x86_64 > /dev/null || packages+=(qemu-user)
if [ ${#packages[@]} -gt 0 ] && command -v apt-get > /dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y -q "${packages[@]}" > /dev/null ||
    { $sudo apt-get update -q > /dev/null && $sudo apt-get install -y -q "${packages[@]}" > /dev/null; }
fi

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# At most 2 compile jobs: each C++ file with torch headers takes up to 1 GB.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e .
