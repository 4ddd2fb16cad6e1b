// Every op of memkernels, declared once. Kernels attach per device elsewhere:
// CPU in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(memkernels, CPU, m)); CUDA from Python
// (memkernels/ops/_cuda.py), which picks the Triton or the CUDA C++ kernel (csrc/cuda/*.cu).
// Fake kernels for torch.compile live in memkernels/ops/__init__.py.
#include <torch/library.h>

TORCH_LIBRARY(memkernels, m) {
  // y = f(x) and what backward keeps: f'(x) in x's dtype (bits == 0) or a packed k-bit code of
  // the interval of x among `borders` (float32, 2**bits - 1 values, sorted), uint8 of
  // ceil(numel / 8) * bits bytes. p0, p1: the activation's parameters (see spec.py).
  m.def("activation_forward(Tensor x, int activation, float p0, float p1, int bits, Tensor? borders) -> (Tensor, Tensor)");
  // grad_in = grad_out * f'(x): `saved` as activation_forward returned it; with bits > 0
  // f'(x) is levels[code], levels float32 of 2**bits values.
  m.def("activation_backward(Tensor grad_out, Tensor saved, int bits, Tensor? levels) -> Tensor");
  // Gated linear unit y = f(a) * b (f: SiLU, GELU, GELU-tanh). Returns (y, code): with bits > 0
  // the packed code of a (backward then keeps code and b); with bits == 0 an empty uint8 tensor
  // (backward keeps a and b, which an op may not return as outputs since they alias inputs).
  m.def("gated_forward(Tensor a, Tensor b, int activation, int bits, Tensor? borders) -> (Tensor, Tensor)");
  // (grad_a, grad_b) = (g * b * f'(a), g * f(a)); with bits > 0 f' and f are
  // levels[code] and value_levels[code].
  m.def("gated_backward(Tensor grad_out, Tensor saved_a, Tensor b, int activation, int bits, Tensor? levels, Tensor? value_levels) -> (Tensor, Tensor)");
  // Pack uint8 codes (< 2**bits) k bits an element; the layout is in memkernels/reference.py.
  m.def("pack_bits(Tensor codes, int bits) -> Tensor");
  m.def("unpack_bits(Tensor packed, int bits, int numel) -> Tensor");
  // (e @ B) * derivative: e (N, K), B (K, out_features) the random feedback matrix of (seed, layer)
  // with entries uniform in [-scale, scale], generated from Philox and never stored (the rule is
  // in memkernels/reference.py); derivative (N, out_features) in e's dtype, or None.
  m.def("feedback_project(Tensor e, int seed, int layer, int out_features, float scale, Tensor? derivative) -> Tensor");
}
