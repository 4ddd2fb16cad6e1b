#!/usr/bin/env bash
# Sets up a fresh machine for memkernels: torch (a CPU build where there is no NVIDIA GPU, so a
# CPU-only machine never downloads a CUDA build), triton, the build tools, then builds
# memkernels._C against that torch and installs the package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PY -m pip install "torch>=2.11"
  else
    # The +cpu build comes from a local wheel directory or PyTorch's CPU wheel index (pass it
    # with --extra-index-url through PIP_EXTRA_INDEX_URL); PyPI's plain torch is a CUDA build.
    $PY -m pip install "torch==2.13.0+cpu"
  fi
fi
# Triton runs the GPU kernels (and, with TRITON_INTERPRET=1, their tests on CPU).
$PY -c "import triton" 2>/dev/null || $PY -m pip install "triton==3.9.0"
# transformers: mk.convert swaps its activation classes, and a test holds it to the real ones.
# pytest-xdist: scripts/test.sh runs the tests on every core.
$PY -m pip install ninja numpy pytest pytest-xdist scikit-learn matplotlib transformers
$PY -m pip install --no-build-isolation -e .

# Triton 3.6 (the one torch 2.11 pairs with, on our GPU machines) in a venv over this torch, for
# scripts/check_triton.py: each triton version lowers the kernels differently. Skipped with a GPU,
# where the tests compile and run the kernels with the triton installed.
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } \
    && ! build/triton-3.6/bin/python -c "import triton" 2>/dev/null; then
  $PY -m venv --system-site-packages build/triton-3.6
  build/triton-3.6/bin/python -m pip install "triton==3.6.0"
fi
