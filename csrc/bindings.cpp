// The Python module memkernels._C. Importing it runs the op registrations (ops.cpp, autograd.cpp,
// cpu/*.cpp, cuda/dispatch.cpp). Its Python functions include the CUDA C++ kernels, which
// memkernels/ops/_cuda.py calls where MEMKERNELS_BACKEND picks them.
#include <torch/extension.h>

#include "autograd.h"
#include "cpu/activation_kernels.h"
#include "planner/planner.h"

#ifdef MEMKERNELS_WITH_CUDA
#include "cuda/kernels.h"
#endif

PYBIND11_MODULE(_C, m) {
  memkernels::planner::bind(m);
  m.def("set_second_derivative_error", &memkernels::set_second_derivative_error,
        "The message of the error that the C++ autograd nodes raise under create_graph=True.");
  m.def("cpu_kernels_isa", &memkernels::cpu::activation_kernels_isa,
        "The instruction set of the CPU activation kernels in use: AVX2, AVX512 or AVX512_BF16.");
  m.attr("with_cuda") = py::bool_(
#ifdef MEMKERNELS_WITH_CUDA
      true
#else
      false
#endif
  );
#ifdef MEMKERNELS_WITH_CUDA
  memkernels::cuda::bind(m);
#endif
}
