"""The CUDA kernels of the ops: Triton (memkernels/triton) or CUDA C++ (memkernels._C).

``MEMKERNELS_BACKEND=triton|cuda`` forces one for every op that has it. Unset, each op takes
``DEFAULT_BACKEND[op]``, the backend bench/activations.py measured faster on a GPU; ops the CUDA C++
kernels do not cover (other activations, pack_bits) always run Triton.
"""
from __future__ import annotations

import os

import torch

from memkernels.activations.spec import GATES

BACKENDS = ("triton", "cuda")

# Until bench/activations.py has run on a GPU, Triton is the default: it covers every op.
DEFAULT_BACKEND = {
    "activation_forward": "triton",
    "activation_backward": "triton",
    "gated_forward": "triton",
    "gated_backward": "triton",
}

# The CUDA C++ kernels cover these activations (activation_* ops) and every gate (gated_* ops).
CUDA_CPP_ACTIVATIONS = frozenset(int(a) for a in GATES)
OPS = ("activation_forward", "activation_backward", "gated_forward", "gated_backward",
       "pack_bits", "unpack_bits")


def backend_for(op: str) -> str:
    """The backend that runs `op` on CUDA tensors: the environment's choice or the default."""
    forced = os.environ.get("MEMKERNELS_BACKEND")
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"MEMKERNELS_BACKEND must be one of {BACKENDS}, got {forced!r}")
    if op not in DEFAULT_BACKEND:
        return "triton"
    backend = forced or DEFAULT_BACKEND[op]
    if backend == "cuda":
        from memkernels import _C
        if not _C.with_cuda:
            raise RuntimeError("MEMKERNELS_BACKEND=cuda, but memkernels._C was built without CUDA "
                               "kernels; rebuild with a CUDA build of torch and nvcc on PATH")
    return backend


def _covered_by_cuda_cpp(op: str, args) -> bool:
    # activation_forward(x, activation, ...) names the activation; backward ops learn it from
    # their saved tensors and are covered for every activation their forward was.
    if op == "activation_forward":
        return args[1] in CUDA_CPP_ACTIVATIONS
    return True


def _kernel(op: str):
    def run(*args):
        if backend_for(op) == "cuda" and _covered_by_cuda_cpp(op, args):
            from memkernels import _C
            return getattr(_C, op)(*args)
        from memkernels.triton import activations as triton_kernels
        return getattr(triton_kernels, op)(*args)
    run.__name__ = f"{op}_cuda"
    return run


for _op in OPS:
    torch.library.register_kernel(f"memkernels::{_op}", "cuda", _kernel(_op))
