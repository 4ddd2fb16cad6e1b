// Python bindings of the CUDA C++ kernels (activations, auxiliary sign, feedback_project), compiled
// by the host compiler (pybind11 and torch/extension.h are slow to parse under nvcc). The ops' CUDA
// kernels (csrc/cuda/dispatch.cpp) call the C++ functions directly; memkernels/ops/_cuda.py's kernel
// calls these bindings where it picks CUDA C++ itself (MEMKERNELS_BACKEND=cuda).
#include <torch/extension.h>

#include "cuda/kernels.h"

namespace memkernels::cuda {

void bind(pybind11::module_& m) {
  using pybind11::arg;
  m.def("activation_forward", &activation_forward, arg("x"), arg("activation"), arg("p0"),
        arg("p1"), arg("bits"), arg("borders"),
        "(f(x), saved): saved = f'(x) (bits == 0) or x's packed k-bit code. CUDA C++: GELU, "
        "GELU_TANH, SILU.");
  m.def("activation_value", &activation_value, arg("x"), arg("activation"), arg("p0"), arg("p1"),
        "f(x) alone, the values of activation_forward. CUDA C++: GELU, GELU_TANH, SILU.");
  m.def("activation_backward", &activation_backward, arg("grad_out"), arg("saved"), arg("bits"),
        arg("levels"), "grad_out * f'(x); f'(x) = saved (bits == 0) or levels[code].");
  m.def("activation_backward_from_input", &activation_backward_from_input, arg("grad_out"), arg("x"),
        arg("activation"), arg("p0"), arg("p1"),
        "grad_out * f'(x), f'(x) computed from x. CUDA C++: GELU, GELU_TANH, SILU.");
  m.def("gated_forward", &gated_forward, arg("a"), arg("b"), arg("activation"), arg("bits"),
        arg("borders"), "(f(a) * b, packed code of a or an empty uint8 tensor when bits == 0).");
  m.def("gated_backward", &gated_backward, arg("grad_out"), arg("saved_a"), arg("b"),
        arg("activation"), arg("bits"), arg("levels"), arg("value_levels"),
        "(g * b * f'(a), g * f(a)); f', f = levels[code], value_levels[code] when bits > 0.");
  m.def("auxiliary_sign_forward", &auxiliary_sign_forward, arg("x"), arg("eps"),
        arg("nonnegative"),
        "(x + eps * s(x), signs [x > 0] packed 1 bit a value, ceil(cols / 8) bytes a row) of 2-D x.");
  m.def("feedback_project", &feedback_project, arg("e"), arg("seed"), arg("layer"), arg("out_features"),
        arg("scale"), arg("derivative"),
        "(e @ B) * derivative, B of (seed, layer) generated from Philox in the kernel, never stored.");
  bind_dispatch(m);
}

}  // namespace memkernels::cuda
