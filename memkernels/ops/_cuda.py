"""The CUDA kernels of the ops: Triton (memkernels/triton) or CUDA C++ (memkernels._C).

``MEMKERNELS_BACKEND=triton|cuda`` forces one for every op that has it. Unset, each op takes
``DEFAULT_BACKEND[op]``: what ``cuda_backends.json`` beside this module says, or "triton" for an
op it does not name. That file is written only by the benchmarks run with ``--pick-backends`` on a
GPU, each for the ops it measures: bench/activations.py (activation_* and gated_* ops),
bench/linear.py (auxiliary_sign_forward), bench/feedback.py (feedback_project). Per op it holds the
backend with the smaller total time, the totals it was picked from, the rule, device, versions and
command. A file that is not such a record fails the import, naming the file.
A build without the CUDA C++ kernels (``memkernels._C.with_cuda`` false) runs Triton where the
file says "cuda". activation_value follows activation_forward's backend, so that a call no
gradient can need gives the values a recorded one does. Ops the CUDA C++ kernels do not cover
(other activations, pack_bits) always run Triton, as do quantize_groups, dequantize_groups and
weight_grad_from_codes.

Where the decision is made: here (backend_for), in the kernel that _kernel builds. In a build with
CUDA C++ the ops that have it are registered in C++ (csrc/cuda/dispatch.cpp) and told the result
of that decision for an unset MEMKERNELS_BACKEND (publish_defaults): they run those CUDA C++ calls
without entering Python (autograd's backward runs them on its own thread, where Python would take
the GIL), and hand every other call to _kernel's.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from memkernels import _C
from memkernels.activations.spec import GATES

BACKENDS = ("triton", "cuda")
# The ops that have both backends; each takes its default from BACKENDS_FILE.
CHOSEN_OPS = ("activation_forward", "activation_backward", "activation_backward_from_input",
              "gated_forward", "gated_backward", "auxiliary_sign_forward", "feedback_project")
BACKENDS_FILE = Path(__file__).with_name("cuda_backends.json")

# The CUDA C++ kernels cover these activations (activation_forward, activation_value,
# activation_backward_from_input) and every gate (gated_* ops).
CUDA_CPP_ACTIVATIONS = frozenset(int(a) for a in GATES)
# Ops that run on the backend another op was given: the values of activation_value must be
# activation_forward's bit for bit.
FOLLOWS = {"activation_value": "activation_forward"}
# The module of memkernels/triton that holds each op's Triton host function.
TRITON_MODULES = {
    **dict.fromkeys(("activation_forward", "activation_value", "activation_backward",
                     "activation_backward_from_input", "gated_forward", "gated_backward", "pack_bits",
                     "unpack_bits"), "activations"),
    **dict.fromkeys(("auxiliary_sign_forward", "quantize_groups", "dequantize_groups",
                     "weight_grad_from_codes"), "compress"),
    "feedback_project": "feedback",
}
OPS = tuple(TRITON_MODULES)


def read_default_backends() -> dict[str, str]:
    """{op: backend} for every op of CHOSEN_OPS: BACKENDS_FILE's "defaults", "triton" where it has
    none (Triton covers every op; no file means no GPU measurement was made)."""
    defaults = dict.fromkeys(CHOSEN_OPS, "triton")
    if not BACKENDS_FILE.exists():
        return defaults

    def malformed(why: str) -> RuntimeError:
        return RuntimeError(f"{BACKENDS_FILE}: {why}. It should be what the benchmarks write with "
                            "--pick-backends on a GPU; delete it to run Triton by default")

    try:
        record = json.loads(BACKENDS_FILE.read_text())
    except json.JSONDecodeError as error:
        raise malformed(f"not valid JSON ({error})") from error
    chosen = record.get("defaults") if isinstance(record, dict) else None
    if not isinstance(chosen, dict):
        raise malformed('no "defaults" object of {op: backend}')
    unknown_ops = sorted(set(chosen) - set(CHOSEN_OPS))
    if unknown_ops:
        raise malformed(f"unknown op(s) {unknown_ops} in \"defaults\"; known: {list(CHOSEN_OPS)}")
    unknown_backends = {op: b for op, b in chosen.items() if b not in BACKENDS}
    if unknown_backends:
        raise malformed(f"unknown backend(s) {unknown_backends} in \"defaults\"; known: {list(BACKENDS)}")
    defaults.update(chosen)
    return defaults


def runnable_defaults(defaults: dict[str, str], with_cuda: bool) -> dict[str, str]:
    """`defaults` with "cuda" replaced by "triton" when the build has no CUDA C++ kernels."""
    return defaults if with_cuda else dict.fromkeys(defaults, "triton")


DEFAULT_BACKEND = runnable_defaults(read_default_backends(), _C.with_cuda)


def reload_default_backends() -> None:
    """DEFAULT_BACKEND read again from BACKENDS_FILE: a benchmark that rewrote the file runs its
    later measurements on what it picked."""
    DEFAULT_BACKEND.update(runnable_defaults(read_default_backends(), _C.with_cuda))
    publish_defaults()


def publish_defaults() -> None:
    """Tell the CUDA kernels registered in C++ (csrc/cuda/dispatch.cpp) which ops run CUDA C++ by
    default and which activations it covers: those calls then run without Python. A build without
    them has nothing to tell."""
    if _C.with_cuda:
        defaults = [op for op in _C.cuda_cpp_ops if DEFAULT_BACKEND.get(FOLLOWS.get(op, op)) == "cuda"]
        _C.set_cuda_cpp_defaults(defaults, sorted(CUDA_CPP_ACTIVATIONS))


def backend_for(op: str) -> str:
    """The backend that runs `op` on CUDA tensors: the environment's choice or the default."""
    forced = os.environ.get("MEMKERNELS_BACKEND")
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"MEMKERNELS_BACKEND must be one of {BACKENDS}, got {forced!r}")
    op = FOLLOWS.get(op, op)
    if op not in DEFAULT_BACKEND:
        return "triton"
    backend = forced or DEFAULT_BACKEND[op]
    if backend == "cuda" and not _C.with_cuda:
        raise RuntimeError("MEMKERNELS_BACKEND=cuda, but memkernels._C was built without CUDA "
                           "kernels; rebuild with a CUDA build of torch and nvcc on PATH")
    return backend


def _covered_by_cuda_cpp(op: str, args) -> bool:
    # activation_forward and activation_value (x, activation, ...) and
    # activation_backward_from_input (grad_out, x, activation, ...) name the activation; the other
    # backward ops learn it from their saved tensors and are covered for every activation their
    # forward was.
    if op in ("activation_forward", "activation_value"):
        return args[1] in CUDA_CPP_ACTIVATIONS
    if op == "activation_backward_from_input":
        return args[2] in CUDA_CPP_ACTIVATIONS
    return True


def _kernel(op: str):
    def run(*args):
        # Triton launches on the current device and its stream, not on its arguments' device (the
        # dispatcher sets no guard for these kernels): with a tensor on cuda:1 while cuda:0 is
        # current, the launch fails. Every op's first tensor is on the device it runs on.
        with torch.cuda.device_of(next(a for a in args if isinstance(a, torch.Tensor))):
            if backend_for(op) == "cuda" and _covered_by_cuda_cpp(op, args):
                return getattr(_C, op)(*args)
            triton_kernels = importlib.import_module(f"memkernels.triton.{TRITON_MODULES[op]}")
            return getattr(triton_kernels, op)(*args)
    run.__name__ = f"{op}_cuda"
    return run


# The ops that have CUDA C++ kernels get their CUDA kernel in C++ (csrc/cuda/dispatch.cpp), which runs
# the default CUDA C++ calls itself and hands every other call to _kernel's; the others, and every
# op of a build without CUDA C++, get _kernel's here.
for _op in OPS:
    if _C.with_cuda and _op in _C.cuda_cpp_ops:
        _C.set_python_kernel(_op, _kernel(_op))
    else:
        torch.library.register_kernel(f"memkernels::{_op}", "cuda", _kernel(_op))
publish_defaults()
