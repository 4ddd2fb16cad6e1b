#!/usr/bin/env bash
# Runs every test of memkernels: pytest (the Python API and the CPU and Triton kernels), the C++
# tests through CMake and ctest, and an nvcc compile of every CUDA source for sm_80 and sm_90.
# Expects scripts/setup.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

$PY -m pytest -q "$@"

torch_prefix=$($PY -c "import torch; print(torch.utils.cmake_prefix_path)")
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$torch_prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake -j "$(nproc)"
ctest --test-dir build/cmake --output-on-failure

if command -v nvcc >/dev/null 2>&1; then
  bash scripts/check_nvcc.sh
else
  echo "nvcc not found: CUDA sources not compiled (CI machines have it)"
fi
