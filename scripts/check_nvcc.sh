#!/usr/bin/env bash
# Compile every CUDA source of memkernels without a GPU: csrc/cuda/*.cu with nvcc -c for sm_80 and
# sm_90 with the flags setup.py's build gives them (torch's COMMON_NVCC_FLAGS), and csrc/cuda/*.cpp
# (their Python bindings) with the host compiler, against the installed torch's headers. Exits
# non-zero if any compile fails, or if the PTX holds approximate math that the tests' tolerances
# and exact codes do not allow (what --use_fast_math brings: tanh.approx, division approximations,
# comparisons that flush subnormals). Works with a CPU-only torch, which ships the c10/cuda and
# ATen/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h.
#
#   scripts/check_nvcc.sh
#   NVCC=... CXX=... PYTHON=... STD=c++20 scripts/check_nvcc.sh   # other tools or standard
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
CXX="${CXX:-c++}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
STD="${STD:-c++17}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

mapfile -t TORCH_INCLUDES < <("$PYTHON" -c '
from torch.utils.cpp_extension import include_paths
for p in include_paths():  # device_type="cpu": the CUDA variant also wants CUDA_HOME
    print(p)')
PY_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
INCLUDES=(-I"$ROOT/csrc" -I"$PY_INCLUDE")
for p in "${TORCH_INCLUDES[@]}"; do INCLUDES+=(-I"$p"); done

DEFINES=(-DMEMKERNELS_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H)
if [[ ! -f "${TORCH_INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  DEFINES+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)  # CPU-only torch: the header is not shipped
fi

mapfile -t TORCH_NVCC_FLAGS < <("$PYTHON" -c '
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
print("\n".join(COMMON_NVCC_FLAGS))')
NVCC_FLAGS=(-c -std="$STD" -O3 "${TORCH_NVCC_FLAGS[@]}"
            -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
            -Xcompiler -fPIC "${DEFINES[@]}" "${INCLUDES[@]}")
APPROXIMATE='tanh\.approx\.f32|div\.(approx|full)\.f32|setp\.[a-z]+\.ftz\.f32'
CXX_FLAGS=(-c -std="$STD" -O1 -fPIC "${DEFINES[@]}" "${INCLUDES[@]}")

# One background job a source: nvcc and the host compiler overlap on 2 cores.
pids=()
names=()
shopt -s nullglob
for src in "$ROOT"/csrc/cuda/*.cu; do
  name="$(basename "$src")"
  mkdir -p "$OUT/$name.keep"  # -keep leaves the PTX of this compile there
  "$NVCC" "${NVCC_FLAGS[@]}" -keep -keep-dir "$OUT/$name.keep" "$src" -o "$OUT/$name.o" \
    >"$OUT/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
done
for src in "$ROOT"/csrc/cuda/*.cpp; do
  name="$(basename "$src")"
  "$CXX" "${CXX_FLAGS[@]}" "$src" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
done
if [[ ${#pids[@]} -eq 0 ]]; then
  echo "check_nvcc: no sources in $ROOT/csrc/cuda" >&2
  exit 1
fi

status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    ptx=("$OUT/${names[$i]}.keep"/*.ptx)
    approximate=$(cat "${ptx[@]}" /dev/null | grep -oE "$APPROXIMATE" | sort | uniq -c || true)
    if [[ ${names[$i]} == *.cu && ${#ptx[@]} -eq 0 ]]; then
      status=1
      echo "FAILED ${names[$i]}: nvcc -keep left no PTX to check"
      continue
    elif [[ -n "$approximate" ]]; then
      status=1
      echo "FAILED ${names[$i]}: approximate math in its PTX:"
      echo "$approximate"
      continue
    fi
    echo "ok     ${names[$i]}"
  else
    status=1
    echo "FAILED ${names[$i]}"
    grep -E "error|Error" -A3 "$OUT/${names[$i]}.log" | head -60 || cat "$OUT/${names[$i]}.log"
  fi
done
exit "$status"
