"""Builds memkernels._C against the installed torch: CPU kernels always, CUDA C++ kernels when
that torch has CUDA and nvcc is found (never decided by whether a GPU is present).

    pip install --no-build-isolation .

Switches: MEMKERNELS_CUDA=0 skips the CUDA kernels, MEMKERNELS_CUDA=1 demands them;
DEBUG=1 builds without optimisation and with asserts; TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("MEMKERNELS_CUDA")
    available = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if flag == "1" and not available:
        raise RuntimeError("MEMKERNELS_CUDA=1 but torch has no CUDA or CUDA_HOME/nvcc is missing")
    return available if flag is None else flag == "1"


def extension():
    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # ATen's Vectorized picks its AVX2 implementation (with Sleef from libtorch) from this macro.
    cxx = opt + ["-std=c++17", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-fopenmp"]
    sources = ["csrc/ops.cpp", "csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/planner/*.cpp"))
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # No --use_fast_math: it makes tanhf tanh.approx.f32 (relative error ~5e-4) and flushes
        # subnormals to zero in comparisons, which changes the codes and signs of subnormal inputs.
        nvcc = opt + ["-std=c++17", "-DMEMKERNELS_WITH_CUDA"]
        return cpp_extension.CUDAExtension(
            "memkernels._C", sources,
            extra_compile_args={"cxx": cxx + ["-DMEMKERNELS_WITH_CUDA"], "nvcc": nvcc}, **kwargs)
    return cpp_extension.CppExtension("memkernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="memkernels",
    version="0.1.0",
    description="Kernels that cut the memory of training: fused activations, compressed saves, "
                "random feedback, checkpoint planning",
    packages=find_packages(include=["memkernels", "memkernels.*"]),
    package_data={"memkernels.activations": ["tables.json"], "memkernels.ops": ["cuda_backends.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["numpy"],
)
