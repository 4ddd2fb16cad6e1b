"""memkernels' Triton modules, importable so that their kernels run here: on CUDA tensors with a
GPU, and without one on CPU tensors under TRITON_INTERPRET=1 (small shapes: the interpreter runs
about a million elements a second, and tl.dot is slow there)."""
import importlib
import os

import torch
import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Before memkernels.triton decorates its kernels (tests/conftest.py sets it too).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_modules(*names: str):
    """The modules memkernels.triton.<name>, in the order given (a module after those it imports).
    Without a GPU, any of them decorated before TRITON_INTERPRET was set is decorated again."""
    modules = [importlib.import_module(f"memkernels.triton.{name}") for name in names]
    if DEVICE == "cpu" and not all(_interpreted(m) for m in modules):
        os.environ["TRITON_INTERPRET"] = "1"
        modules = [importlib.reload(m) for m in modules]
    return modules


def _interpreted(module) -> bool:
    # Under TRITON_INTERPRET=1, triton.jit makes interpreted functions, not JITFunctions.
    return not any(isinstance(v, triton.runtime.JITFunction) for v in vars(module).values())
