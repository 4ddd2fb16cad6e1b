// CUDA C++ kernels of the fused activation ops (csrc/cuda/activations.cu), of the auxiliary sign
// activation (csrc/cuda/compress.cu) and of feedback_project (csrc/cuda/feedback.cu), and their
// Python bindings (csrc/cuda/bind.cpp). They cover GELU, GELU-tanh and SiLU in activation_forward,
// activation_value and activation_backward_from_input, every activation in activation_backward
// (which only multiplies by f'), every gate in the gated ops, auxiliary_sign_forward and
// feedback_project; signatures and results are those of the ops in csrc/ops.cpp
// (memkernels/reference.py).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace pybind11 {
class module_;
}

namespace memkernels::cuda {

// (f(x), saved): saved = f'(x) (bits == 0) or the packed k-bit code of x among `borders`.
std::tuple<at::Tensor, at::Tensor> activation_forward(const at::Tensor& x, int64_t activation,
                                                      double p0, double p1, int64_t bits,
                                                      const std::optional<at::Tensor>& borders);
// f(x) alone, the values activation_forward writes.
at::Tensor activation_value(const at::Tensor& x, int64_t activation, double p0, double p1);
// grad_out * f'(x), f'(x) = saved (bits == 0) or levels[code].
at::Tensor activation_backward(const at::Tensor& grad_out, const at::Tensor& saved, int64_t bits,
                               const std::optional<at::Tensor>& levels);
// grad_out * f'(x), f'(x) computed from x as activation_forward computes it.
at::Tensor activation_backward_from_input(const at::Tensor& grad_out, const at::Tensor& x,
                                          int64_t activation, double p0, double p1);
// (f(a) * b, code of a or an empty uint8 tensor when bits == 0).
std::tuple<at::Tensor, at::Tensor> gated_forward(const at::Tensor& a, const at::Tensor& b,
                                                 int64_t activation, int64_t bits,
                                                 const std::optional<at::Tensor>& borders);
// (g * b * f'(a), g * f(a)); saved_a is a (bits == 0) or its code, then f' and f are
// levels[code] and value_levels[code].
std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& grad_out,
                                                  const at::Tensor& saved_a, const at::Tensor& b,
                                                  int64_t activation, int64_t bits,
                                                  const std::optional<at::Tensor>& levels,
                                                  const std::optional<at::Tensor>& value_levels);

// (x + eps * s(x), signs packed 1 bit a value, ceil(cols / 8) bytes a row) of x [rows, cols]:
// s(x) = +1 / -1 for x > 0 / otherwise (1 / 0 when nonnegative).
std::tuple<at::Tensor, at::Tensor> auxiliary_sign_forward(const at::Tensor& x, double eps,
                                                          bool nonnegative);
// (e @ B) * derivative, B (K, out_features) of (seed, layer) generated from Philox in the kernel.
at::Tensor feedback_project(const at::Tensor& e, int64_t seed, int64_t layer, int64_t out_features,
                            double scale, const std::optional<at::Tensor>& derivative);

// Adds the functions above to the module memkernels._C (called from csrc/bindings.cpp), and
// bind_dispatch's (called from bind).
void bind(pybind11::module_& m);
// The settings of the ops' CUDA kernels registered in csrc/cuda/dispatch.cpp, which run the
// functions above or memkernels/ops/_cuda.py's kernel.
void bind_dispatch(pybind11::module_& m);

}  // namespace memkernels::cuda
