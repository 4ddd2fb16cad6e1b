"""Builds memkernels._C against the installed torch: CPU kernels always, CUDA C++ kernels when
that torch has CUDA and nvcc is found (never decided by whether a GPU is present).

    pip install --no-build-isolation .

Switches: MEMKERNELS_CUDA=0 skips the CUDA kernels, MEMKERNELS_CUDA=1 demands them;
DEBUG=1 builds without optimisation and with asserts; TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
"""
import glob
import os
import subprocess

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
    # -g0 undoes the -g of Python's own CFLAGS, which the host compiler gets first: the debug
    # information of the kernels' many template instances was 140 of the library's 150 MB.
    host_opt = opt if debug else opt + ["-g0"]
    # ATen's Vectorized picks its AVX2 implementation (with Sleef from libtorch) from this macro.
    cxx = host_opt + ["-std=c++17", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-fopenmp"]
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/planner/*.cpp"))
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


def check_shared_libstdcxx(library: str) -> None:
    """Fails the build where the compiler linked libstdc++ into the extension (as a CUDA image's
    compiler wrapper did): that second C++ runtime beside torch's crashes the process on the
    first number written into an error message (its locale is not set up)."""
    try:
        dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return  # no readelf (binutils) to look with
    if "libstdc++" not in dynamic:
        raise RuntimeError(
            f"{library} has libstdc++ linked into it by {os.environ.get('CXX', 'the C++ compiler')}, "
            "not loaded as libstdc++.so.6: its error messages would crash the process. Build with a "
            "compiler that links it dynamically, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++")


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def build_extensions(self):
        super().build_extensions()
        for ext in self.extensions:
            check_shared_libstdcxx(self.get_ext_fullpath(ext.name))


setup(
    name="memkernels",
    version="0.1.0",
    description="Kernels that cut the memory of training: fused activations, compressed saves, "
                "random feedback, checkpoint planning",
    packages=find_packages(include=["memkernels", "memkernels.*"]),
    package_data={"memkernels.activations": ["tables.json"], "memkernels.ops": ["cuda_backends.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["numpy"],
)
