#!/usr/bin/env bash
# Runs every test of memkernels: pytest (the Python API and the CPU and Triton kernels), the C++
# tests through CMake and ctest, an nvcc compile of every CUDA source for sm_80 and sm_90, and a
# compile of every Triton kernel for sm_80 and sm_90 with this triton (for sm_90 with 3.6 too).
# Expects scripts/setup.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# On every core (pytest-xdist): serial, the suite took 6 of CI's 20 minutes. The shorter passes
# below stay serial: xdist's start-up made them slower (68 s against 58).
$PY -m pytest -q -n auto "$@"

# The CPU kernels exist in an AVX2, an AVX512 and an AVX512-with-AVX512-BF16 build; pytest runs
# the best this machine has, so the kernel tests run again with ATen (and so memkernels) held to
# each lower one. The torch.compile tests stay out of those passes: held to AVX2, inductor's
# generated loops assume the machine's AVX512 width while ATen's vectors are AVX2-wide, and its own
# sums come out wrong.
case "$($PY -c 'import memkernels._C as C; print(C.cpu_kernels_isa())')" in
  AVX512_BF16) held="avx512 avx2" ;;
  AVX512) held="avx2" ;;
  *) held="" ;;
esac
for isa in $held; do
  ATEN_CPU_CAPABILITY=$isa $PY -m pytest -q -k "not compile" tests/test_cpu_kernels.py tests/test_functional.py \
    tests/test_gated.py tests/test_ops.py tests/test_compress.py tests/test_feedback_ops.py
done

torch_prefix=$($PY -c "import torch; print(torch.utils.cmake_prefix_path)")
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$torch_prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake -j "$(nproc)"
ctest --test-dir build/cmake --output-on-failure

if command -v nvcc >/dev/null 2>&1; then
  bash scripts/check_nvcc.sh
else
  echo "nvcc not found: CUDA sources not compiled (CI machines have it)"
fi

# The tests run the Triton kernels under the interpreter, which never lowers them: compile each
# one for the GPU too, with the triton installed and with 3.6 (sm_90 only: our H100s) if set up.
$PY scripts/check_triton.py
if [ -x build/triton-3.6/bin/python ]; then
  build/triton-3.6/bin/python scripts/check_triton.py --archs 90
else
  echo "build/triton-3.6 not set up (scripts/setup.sh makes it on machines without a GPU): Triton 3.6 compile skipped"
fi
