// The CPU kernels behind the ops of activations.cpp, compiled once per instruction set: AVX2
// (activation_kernels_avx2.cpp), AVX512 (activation_kernels_avx512.cpp) and AVX512 with
// AVX512-BF16 (activation_kernels_avx512_bf16.cpp), each from activation_kernels_impl.h;
// activation_kernels() picks one at run time, as ATen's DispatchStub picks its own kernels (so
// ATEN_CPU_CAPABILITY=avx2 selects the AVX2 ones here too, and =avx512 the plain AVX512 ones).
#pragma once
#include <ATen/core/Tensor.h>

#include "activations.h"

namespace memkernels::cpu {

// Kernels on tensors that activations.cpp has checked: contiguous, of one floating dtype and
// numel; outputs allocated; borders/levels float32 tables, undefined when bits == 0. The backward
// kernels' grad_out is contiguous too, unless grad_broadcast: then it is one value broadcast to
// every element (an expanded scalar, the gradient of y.sum()), read from its first element.
struct ActivationKernels {
  // y = f(x) and saved = f'(x) (bits == 0) or the packed code of x; saved undefined (bits == 0):
  // y alone.
  void (*forward)(Activation act, const at::Tensor& x, double p0, double p1, int64_t bits, const at::Tensor& borders,
                  const at::Tensor& y, const at::Tensor& saved);
  // grad_in = grad_out * (saved (bits == 0) or levels[code]).
  void (*backward)(const at::Tensor& grad_out, bool grad_broadcast, const at::Tensor& saved, int64_t bits,
                   const at::Tensor& levels, const at::Tensor& grad_in);
  // grad_in = grad_out * f'(x), f' computed from x itself.
  void (*backward_from_input)(Activation act, const at::Tensor& grad_out, bool grad_broadcast, const at::Tensor& x,
                              double p0, double p1, const at::Tensor& grad_in);
  // y = f(a) * b and, when bits > 0, codes = the packed code of a.
  void (*gated_forward)(Activation act, const at::Tensor& a, const at::Tensor& b, int64_t bits,
                        const at::Tensor& borders, const at::Tensor& y, const at::Tensor& codes);
  // grad_a = g * b * f'(a), grad_b = g * f(a), from a (bits == 0) or from levels / value_levels.
  void (*gated_backward)(Activation act, const at::Tensor& grad_out, bool grad_broadcast, const at::Tensor& saved_a,
                         const at::Tensor& b, int64_t bits, const at::Tensor& levels,
                         const at::Tensor& value_levels, const at::Tensor& grad_a, const at::Tensor& grad_b);
};

namespace AVX2 {
extern const ActivationKernels kActivationKernels;
}
namespace AVX512 {
extern const ActivationKernels kActivationKernels;
}
namespace AVX512_BF16 {
extern const ActivationKernels kActivationKernels;
}

// The kernels for this CPU (and ATEN_CPU_CAPABILITY), and the name of their instruction set:
// "AVX2", "AVX512" or "AVX512_BF16".
const ActivationKernels& activation_kernels();
const char* activation_kernels_isa();

}  // namespace memkernels::cpu
