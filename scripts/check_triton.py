"""Compile every Triton kernel of memkernels for NVIDIA sm_80 and sm_90, on a machine without a GPU.

The tests run the Triton kernels under TRITON_INTERPRET=1, which executes their bodies with numpy
and never lowers them, so a kernel can pass every test and still fail to compile on a GPU (a type
the compiler rejects, a tl.dot shape it does not support, a layout conversion, ptxas). This script
drives the Triton host functions (memkernels/triton/*.py) with small CPU tensors over every dtype,
code width and flag that selects a different kernel, and every activation exact and in 3 bits (the
activation and the code width are independent parts of a kernel, as is the backward's load of a
gradient that is one broadcast value, launched for one activation): a stand-in driver reports a CUDA
target, triton's jit_cache_hook records each kernel specialization the launch asks for (the
signature, constexprs and alignment attributes triton derives from the real arguments) and skips
the launch, then each is compiled to a cubin for every target. Nothing runs; outputs stay unset.

    python scripts/check_triton.py            # every kernel, sm_80 and sm_90, all cores
    python scripts/check_triton.py --archs 90 --jobs 1

Exits 1 if any kernel fails to compile, naming it and its specialization, if its PTX holds
approximate math the tests do not allow (APPROXIMATE), if its sm_90 code spills registers to local
memory (STL in the SASS, read with the cuobjdump triton ships; float64 kernels, there for
gradcheck, are exempt), or if a kernel (a JIT function named *_kernel in memkernels.triton) is
never launched here.
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # before memkernels.triton decorates its kernels
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's present default, set to silence it

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from memkernels.activations.spec import GATES, VALID_BITS, Activation  # noqa: E402

# PTX the tests' tolerances and exact codes do not allow: tanh with a relative error of ~5e-4, and
# comparisons that flush subnormals to zero (tl.exp's ex2.approx and `/`'s div.full are within
# the float32 tolerances, and the codes come from comparisons alone).
APPROXIMATE = r"\b(?:tanh\.approx\.f32|setp\.[a-z]+\.ftz\.f32)"
# sm_90 (our H100s) code that spills is a slowdown nothing else reports: the weight-gradient GEMM
# spilled 176 bytes a thread, and 700-830 where cols % 16 != 0, before its tiles were changed.
SPILL_ARCH = 90
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
OPTION_KEYS = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "launch_cooperative_grid",
               "extern_libs")


class CompileOnlyDriver:
    """What JITFunction.run asks of triton's active driver before it compiles: a device, a stream
    and the target to specialize for. Launching is never reached (the hook below skips it)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


class Recorder:
    """A triton jit_cache_hook keeping one entry per distinct kernel specialization."""

    def __init__(self):
        self.kernels: dict[tuple, tuple] = {}  # (JITFunction, key) -> (JITFunction, compile info)

    def __call__(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        self.kernels.setdefault((fn.jit_function, str(key)), (fn.jit_function, compile))
        return True  # skip compiling and launching: no GPU here


def launch_every_kernel() -> None:
    """Call the Triton host functions once for each choice that selects a different kernel."""
    from memkernels.triton import activations as ta
    from memkernels.triton import compress as tc
    from memkernels.triton import feedback as tf

    numel = 4096  # a multiple of 16, as most sizes are: triton then specializes on alignment
    for dtype in ta._FLOAT_DTYPES:
        x = torch.randn(numel, dtype=dtype)
        one = torch.ones((), dtype=dtype).expand(numel)  # y.sum()'s gradient: GRAD_BROADCAST
        ta.activation_backward_from_input(one, x, int(Activation.GELU), 0.0, 0.0)
        for bits in (0, *VALID_BITS):
            borders = torch.randn((1 << bits) - 1).sort().values if bits else None
            levels = torch.randn(1 << bits) if bits else None
            activations = tuple(Activation) if bits in (0, 3) else (Activation.GELU,)
            for activation in activations:
                _, saved = ta.activation_forward(x, int(activation), 0.5, 20.0, bits, borders)
                if bits == 0:
                    ta.activation_value(x, int(activation), 0.5, 20.0)
                    ta.activation_backward_from_input(x, x, int(activation), 0.5, 20.0)
            for grad in (x, one):
                ta.activation_backward(grad, saved, bits, levels)
            for activation in GATES:
                _, saved = ta.gated_forward(x, x, int(activation), bits, borders)
                for grad in (x, one) if activation == GATES[0] else (x,):
                    ta.gated_backward(grad, x if bits == 0 else saved, x, int(activation), bits, levels, levels)
    for bits in VALID_BITS:
        codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8)
        ta.unpack_bits(ta.pack_bits(codes, bits), bits, numel)

    rows, cols = 48, 264  # cols: 8-column groups, not a multiple of the group size
    for dtype in ta._FLOAT_DTYPES:
        x = torch.randn(rows, cols, dtype=dtype)
        for layout in (x, x.t().contiguous().t()):  # unit column stride, and strided columns
            for nonnegative in (False, True):
                tc.auxiliary_sign_forward(layout, 0.1, nonnegative)
        grad_out = torch.randn(rows, 96, dtype=dtype)
        for bits in tc.CODE_BITS:
            for group_size in (256, 64):
                codes, stats = tc.quantize_groups(x, bits, group_size, torch.tensor(0))
                for group_stats in (stats, None):
                    tc.dequantize_groups(codes, group_stats, cols, bits, group_size, -1.0, 2.0, dtype)
                    tc.weight_grad_from_codes(grad_out, codes, group_stats, cols, bits, group_size, -1.0, 2.0)
    for dtype in tf._DTYPES:
        e = torch.randn(64, 80, dtype=dtype)
        for derivative in (None, torch.randn(64, 96, dtype=dtype)):
            tf.feedback_project(e, 0, 1, 96, 0.5, derivative)


def every_kernel_name() -> list[str]:
    """The names of the kernels (the JIT functions named *_kernel; the others are device functions
    they call) in the modules of memkernels.triton."""
    import memkernels.triton
    names = set()
    for module_info in pkgutil.iter_modules(memkernels.triton.__path__):
        module = importlib.import_module(f"memkernels.triton.{module_info.name}")
        names.update(name for name, value in vars(module).items()
                     if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"))
    return sorted(names)


def describe(fn, info) -> str:
    """The kernel's name with its argument types and constexpr values, as the launch gave them."""
    args = []
    for index, (name, kind) in enumerate(info["signature"].items()):
        args.append(f"{name}={info['constants'][(index,)]}" if kind == "constexpr" else f"{name}: {kind}")
    options = ", ".join(f"{k}={info[k]}" for k in ("num_warps", "num_stages", "enable_fp_fusion"))
    return f"{fn.__name__}({', '.join(args)}) [{options}]"


def local_stores(cubin: bytes) -> int:
    """The number of STL instructions (stores to local memory: register spills) in a cubin's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\bSTL\b", sass))


def compile_one(job: tuple[int, int]) -> tuple[str, int, str | None]:
    """Compile recorded kernel `index` for sm_`arch`: (its description, arch, error or None)."""
    index, arch = job
    fn, info = RECORDED[index]
    try:
        source = ASTSource(fn, info["signature"], info["constants"], info["configs"][0])
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options={k: info[k] for k in OPTION_KEYS})
        approximate = sorted(set(re.findall(APPROXIMATE, kernel.asm["ptx"])))
        error = f"approximate math in the PTX: {', '.join(approximate)}\n" if approximate else None
        spills = local_stores(kernel.asm["cubin"]) if arch == SPILL_ARCH and "*fp64" not in \
            info["signature"].values() else 0
        if spills:
            error = (error or "") + f"spills registers: {spills} local-memory stores (STL) in its SASS\n"
        return describe(fn, info), arch, error
    except Exception as error:  # every failure is listed with its kernel, not just the first
        causes = [error] + ([error.__cause__] if error.__cause__ else [])
        return describe(fn, info), arch, "".join(
            line for e in causes for line in traceback.format_exception_only(type(e), e))


RECORDED: list[tuple] = []  # filled before the worker processes fork


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiling processes")
    args = parser.parse_args()
    archs = [int(a) for a in args.archs.split(",")]

    recorder = Recorder()
    triton.runtime.driver.set_active(CompileOnlyDriver(GPUTarget("cuda", archs[-1], 32)))
    triton.knobs.runtime.jit_cache_hook = recorder
    from memkernels.triton import activations as ta
    ta._runs_on = lambda device: True  # the host functions take these CPU tensors as if on a GPU
    launch_every_kernel()
    RECORDED.extend(recorder.kernels.values())

    start = time.perf_counter()
    jobs = [(i, arch) for i in range(len(RECORDED)) for arch in archs]
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        results = pool.map(compile_one, jobs, chunksize=4)
    failures = [(d, arch, error) for d, arch, error in results if error]
    for description, arch, error in failures:
        print(f"FAILED sm_{arch}: {description}\n{error}", file=sys.stderr)
    kernels = sorted({fn.__name__ for fn, _ in RECORDED})
    missed = sorted(set(every_kernel_name()) - set(kernels))
    if missed:
        print(f"FAILED: never launched by launch_every_kernel, so not compiled: {', '.join(missed)}",
              file=sys.stderr)
    print(f"Triton: {len(RECORDED)} specializations of {len(kernels)} kernels ({', '.join(kernels)}) "
          f"for sm_{', sm_'.join(map(str, archs))}: {len(jobs) - len(failures)} of {len(jobs)} "
          f"compiled in {time.perf_counter() - start:.0f} s")
    return 1 if failures or missed else 0


if __name__ == "__main__":
    sys.exit(main())
