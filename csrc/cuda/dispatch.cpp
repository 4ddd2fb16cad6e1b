// The CUDA kernels of the ops that have CUDA C++ kernels, registered here rather than from Python so
// that a call that runs CUDA C++ runs no Python: the autograd nodes (csrc/autograd.cpp) reach them
// through the dispatcher in forward and, on the autograd engine's device thread, in backward.
//
// memkernels/ops/_cuda.py decides which backend runs each op. It hands this file its own kernel of
// each op (set_python_kernel) and the ops whose default is CUDA C++ with the activations those
// kernels cover (set_cuda_cpp_defaults). A call runs CUDA C++ here when MEMKERNELS_BACKEND is unset,
// its op defaults to CUDA C++ and its activation is covered; any other call goes to the Python
// kernel, which decides as it always has (the environment's choice, Triton, the errors).
// Compiled by the host compiler, as bind.cpp.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "activations.h"
#include "cuda/kernels.h"

namespace memkernels::cuda {
namespace {

enum Op : int {
  kActivationForward,
  kActivationValue,
  kActivationBackward,
  kActivationBackwardFromInput,
  kGatedForward,
  kGatedBackward,
  kAuxiliarySignForward,
  kFeedbackProject,
  kNumOps
};
constexpr std::array<const char*, kNumOps> kOpNames = {
    "activation_forward", "activation_value", "activation_backward", "activation_backward_from_input",
    "gated_forward",      "gated_backward",   "auxiliary_sign_forward", "feedback_project"};

std::array<std::atomic<bool>, kNumOps> cuda_cpp_default{};
std::array<std::atomic<bool>, kNumActivations> cuda_cpp_covers{};
// Owned references, never released: they live as long as the process, and a Python object must not
// be released by a static destructor after the interpreter has finalised.
std::array<std::atomic<PyObject*>, kNumOps> python_kernels{};

Op op_named(const std::string& name) {
  const auto named = std::find(kOpNames.begin(), kOpNames.end(), name);
  TORCH_CHECK_VALUE(named != kOpNames.end(), "memkernels: no CUDA C++ kernel of an op named '", name, "'");
  return static_cast<Op>(named - kOpNames.begin());
}

// Whether this call runs the CUDA C++ kernel here; `activation` for the ops whose coverage depends on it.
bool runs_cuda_cpp(Op op, std::optional<int64_t> activation = std::nullopt) {
  if (std::getenv("MEMKERNELS_BACKEND") != nullptr || !cuda_cpp_default[op].load(std::memory_order_relaxed)) {
    return false;
  }
  return !activation || (*activation >= 0 && *activation < kNumActivations &&
                         cuda_cpp_covers[*activation].load(std::memory_order_relaxed));
}

template <typename Result, typename... Args>
Result run_python_kernel(Op op, const Args&... args) {
  pybind11::gil_scoped_acquire gil;
  PyObject* kernel = python_kernels[op].load();
  TORCH_CHECK(kernel != nullptr, "memkernels: the Python CUDA kernel of memkernels::", kOpNames[op],
              " is not set (memkernels.ops._cuda sets it on import)");
  return pybind11::reinterpret_borrow<pybind11::object>(kernel)(args...).template cast<Result>();
}

using OptionalTensor = std::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;

TensorPair activation_forward_cuda(const at::Tensor& x, int64_t activation, double p0, double p1, int64_t bits,
                                   const OptionalTensor& borders) {
  if (runs_cuda_cpp(kActivationForward, activation)) {
    return activation_forward(x, activation, p0, p1, bits, borders);
  }
  return run_python_kernel<TensorPair>(kActivationForward, x, activation, p0, p1, bits, borders);
}

at::Tensor activation_value_cuda(const at::Tensor& x, int64_t activation, double p0, double p1) {
  if (runs_cuda_cpp(kActivationValue, activation)) {
    return activation_value(x, activation, p0, p1);
  }
  return run_python_kernel<at::Tensor>(kActivationValue, x, activation, p0, p1);
}

at::Tensor activation_backward_cuda(const at::Tensor& grad_out, const at::Tensor& saved, int64_t bits,
                                    const OptionalTensor& levels) {
  if (runs_cuda_cpp(kActivationBackward)) {
    return activation_backward(grad_out, saved, bits, levels);
  }
  return run_python_kernel<at::Tensor>(kActivationBackward, grad_out, saved, bits, levels);
}

at::Tensor activation_backward_from_input_cuda(const at::Tensor& grad_out, const at::Tensor& x, int64_t activation,
                                               double p0, double p1) {
  if (runs_cuda_cpp(kActivationBackwardFromInput, activation)) {
    return activation_backward_from_input(grad_out, x, activation, p0, p1);
  }
  return run_python_kernel<at::Tensor>(kActivationBackwardFromInput, grad_out, x, activation, p0, p1);
}

TensorPair gated_forward_cuda(const at::Tensor& a, const at::Tensor& b, int64_t activation, int64_t bits,
                              const OptionalTensor& borders) {
  if (runs_cuda_cpp(kGatedForward)) {
    return gated_forward(a, b, activation, bits, borders);
  }
  return run_python_kernel<TensorPair>(kGatedForward, a, b, activation, bits, borders);
}

TensorPair gated_backward_cuda(const at::Tensor& grad_out, const at::Tensor& saved_a, const at::Tensor& b,
                               int64_t activation, int64_t bits, const OptionalTensor& levels,
                               const OptionalTensor& value_levels) {
  if (runs_cuda_cpp(kGatedBackward)) {
    return gated_backward(grad_out, saved_a, b, activation, bits, levels, value_levels);
  }
  return run_python_kernel<TensorPair>(kGatedBackward, grad_out, saved_a, b, activation, bits, levels, value_levels);
}

TensorPair auxiliary_sign_forward_cuda(const at::Tensor& x, double eps, bool nonnegative) {
  if (runs_cuda_cpp(kAuxiliarySignForward)) {
    return auxiliary_sign_forward(x, eps, nonnegative);
  }
  return run_python_kernel<TensorPair>(kAuxiliarySignForward, x, eps, nonnegative);
}

at::Tensor feedback_project_cuda(const at::Tensor& e, int64_t seed, int64_t layer, int64_t out_features, double scale,
                                 const OptionalTensor& derivative) {
  if (runs_cuda_cpp(kFeedbackProject)) {
    return feedback_project(e, seed, layer, out_features, scale, derivative);
  }
  return run_python_kernel<at::Tensor>(kFeedbackProject, e, seed, layer, out_features, scale, derivative);
}

void set_python_kernel(const std::string& op, pybind11::object kernel) {
  PyObject* old = python_kernels[op_named(op)].exchange(kernel.release().ptr());
  Py_XDECREF(old);  // called with the GIL held, from Python
}

void set_cuda_cpp_defaults(const std::vector<std::string>& ops, const std::vector<int64_t>& activations) {
  std::array<bool, kNumOps> chosen{};
  for (const std::string& op : ops) {
    chosen[op_named(op)] = true;
  }
  std::array<bool, kNumActivations> covered{};
  for (int64_t activation : activations) {
    TORCH_CHECK_VALUE(activation >= 0 && activation < kNumActivations, "activation ids must be in [0, ",
                      kNumActivations, "), got ", activation);
    covered[activation] = true;
  }
  for (int64_t activation = 0; activation < kNumActivations; ++activation) {
    cuda_cpp_covers[activation].store(covered[activation]);
  }
  for (int op = 0; op < kNumOps; ++op) {
    cuda_cpp_default[op].store(chosen[op]);
  }
}

}  // namespace

void bind_dispatch(pybind11::module_& m) {
  using pybind11::arg;
  m.attr("cuda_cpp_ops") = pybind11::cast(std::vector<std::string>(kOpNames.begin(), kOpNames.end()));
  m.def("set_python_kernel", &set_python_kernel, arg("op"), arg("kernel"),
        "The Python CUDA kernel of `op` (one of cuda_cpp_ops), which runs every call that the CUDA C++ "
        "kernel does not.");
  m.def("set_cuda_cpp_defaults", &set_cuda_cpp_defaults, arg("ops"), arg("activations"),
        "The ops whose calls run CUDA C++ without asking Python when MEMKERNELS_BACKEND is unset, and "
        "the activation ids their kernels cover (for the ops that take one).");
}

TORCH_LIBRARY_IMPL(memkernels, CUDA, m) {
  m.impl("activation_forward", &activation_forward_cuda);
  m.impl("activation_value", &activation_value_cuda);
  m.impl("activation_backward", &activation_backward_cuda);
  m.impl("activation_backward_from_input", &activation_backward_from_input_cuda);
  m.impl("gated_forward", &gated_forward_cuda);
  m.impl("gated_backward", &gated_backward_cuda);
  m.impl("auxiliary_sign_forward", &auxiliary_sign_forward_cuda);
  m.impl("feedback_project", &feedback_project_cuda);
}

}  // namespace memkernels::cuda
