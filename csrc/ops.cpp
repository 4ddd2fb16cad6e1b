// The ops of memkernels, each declared once. Kernels attach per device elsewhere:
// CPU in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(memkernels, CPU, m)); CUDA in csrc/cuda/dispatch.cpp
// for the ops with CUDA C++ kernels (csrc/cuda/*.cu) and from Python (memkernels/ops/_cuda.py) for
// the others and in builds without CUDA C++, _cuda.py picking Triton or CUDA C++ (see dispatch.cpp);
// the autograd of the two differentiable ops, activation and gated, in csrc/autograd.cpp.
// Fake kernels for torch.compile live in memkernels/ops/__init__.py.
// One op is not here: memkernels::activation_table (memkernels/activations/autograd.py), the
// lookup of the Python-side derivative tables under torch.compile, which is defined in Python so
// that it exists when this extension is not built too.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(memkernels, m) {
  // y = f(x) and what backward keeps: f'(x) in x's dtype (bits == 0) or a packed k-bit code of
  // the interval of x (Hardsigmoid: of -|x|) among `borders` (float32, 2**bits - 1 values,
  // sorted), uint8 of ceil(numel / 8) * bits bytes. p0, p1: the activation's parameters (spec.py).
  m.def("activation_forward(Tensor x, int activation, float p0, float p1, int bits, Tensor? borders) -> (Tensor, Tensor)");
  // y = f(x) alone, the values of activation_forward bit for bit: the forward of a call that no
  // gradient can need (no_grad, inference_mode, an input that does not require grad).
  m.def("activation_value(Tensor x, int activation, float p0, float p1) -> Tensor");
  // grad_in = grad_out * f'(x): `saved` as activation_forward returned it; with bits > 0
  // f'(x) is levels[code], levels float32 of 2**bits values.
  m.def("activation_backward(Tensor grad_out, Tensor saved, int bits, Tensor? levels) -> Tensor");
  // grad_in = grad_out * f'(x), f' computed from x itself as activation_forward computes it: the
  // backward of the exact modes that keep x, where f' costs less to recompute than to write
  // (keeps_input in memkernels/activations/autograd.py).
  m.def("activation_backward_from_input(Tensor grad_out, Tensor x, int activation, float p0, float p1) -> Tensor");
  // Gated linear unit y = f(a) * b (f: SiLU, GELU, GELU-tanh). Returns (y, code): with bits > 0
  // the packed code of a (backward then keeps code and b); with bits == 0 an empty uint8 tensor
  // (backward keeps a and b, which an op may not return as outputs since they alias inputs).
  m.def("gated_forward(Tensor a, Tensor b, int activation, int bits, Tensor? borders) -> (Tensor, Tensor)");
  // (grad_a, grad_b) = (g * b * f'(a), g * f(a)); with bits > 0 f' and f are
  // levels[code] and value_levels[code].
  m.def("gated_backward(Tensor grad_out, Tensor saved_a, Tensor b, int activation, int bits, Tensor? levels, Tensor? value_levels) -> (Tensor, Tensor)");
  // The differentiable fused activations that mk.functional calls (autograd in csrc/autograd.cpp):
  // y = f(x), keeping for backward (`keep`, memkernels.activations.spec.Keep) 0: activation_forward's
  // `saved` (f'(x) or its code; backward: activation_backward with `levels`); 1: x (forward:
  // activation_value; backward: activation_backward_from_input); 2: what torch keeps, Sigmoid and
  // Tanh y, Hardswish x (backward: torch's own op, twice differentiable). Below autograd, f(x) alone.
  m.def("activation(Tensor x, int activation, float p0, float p1, int bits, int keep, Tensor? borders, Tensor? levels) -> Tensor");
  // y = f(a) * b, keeping (a, b) (bits == 0) or (code of a, b) for gated_backward; with copy_b and
  // bits > 0 a contiguous copy of b (b views a larger tensor, which keeping b would keep alive).
  m.def("gated(Tensor a, Tensor b, int activation, int bits, bool copy_b, Tensor? borders, Tensor? levels, Tensor? value_levels) -> Tensor");
  // Pack uint8 codes (< 2**bits) k bits an element; the layout is in memkernels/reference.py. A
  // larger code raises on CPU; the CUDA kernel packs its low bits (a check would sync the device).
  m.def("pack_bits(Tensor codes, int bits) -> Tensor");
  m.def("unpack_bits(Tensor packed, int bits, int numel) -> Tensor");

  // Compressed saved inputs of Linear / Conv2d (memkernels/compress). Every op sees its input as a
  // 2-D [rows, cols] tensor and codes each row on its own: a row's k-bit codes are packed in the
  // layout above into packed_nbytes(cols, k) bytes, so codes are uint8 [rows, ceil(cols / 8) * k].
  //
  // Auxiliary sign activation: (x + eps * s(x), packed [x > 0]) with s(x) = +1 / -1 for x > 0 /
  // otherwise, or 1 / 0 when `nonnegative`; the 1-bit code is all that backward keeps.
  m.def("auxiliary_sign_forward(Tensor x, float eps, bool nonnegative) -> (Tensor, Tensor)");
  // Per-group codes of x: groups of group_size (a multiple of 8) consecutive columns of a row get
  // (min, scale) in bfloat16, stats [rows, ceil(cols / group_size), 2], and the code of each value
  // is floor((x - min) / scale + u) clamped to [0, 2**bits - 1], u uniform from Philox keyed by
  // `seed` (an int64 scalar tensor on the CPU) and the value's (row, col): stochastic rounding, so
  // the dequantized min + scale * code is unbiased.
  m.def("quantize_groups(Tensor x, int bits, int group_size, Tensor seed) -> (Tensor, Tensor)");
  // The values [rows, cols] (dtype) that codes stand for: min + scale * code from `stats`, or, for
  // codes without stats (the sign code), lo + step * code; in float32, rounded once, saturated at
  // dtype's largest finite value (memkernels/reference.py dequantized).
  m.def("dequantize_groups(Tensor codes, Tensor? stats, int cols, int bits, int group_size, float lo, float step, ScalarType dtype) -> Tensor");
  // The weight gradient of a Linear from its coded input: grad_out^T [out, rows] @ x_hat [rows, cols],
  // x_hat dequantized tile by tile as in dequantize_groups and never whole; grad_out's dtype.
  m.def("weight_grad_from_codes(Tensor grad_out, Tensor codes, Tensor? stats, int cols, int bits, int group_size, float lo, float step) -> Tensor");
  // (e @ B) * derivative: e (N, K), B (K, out_features) the random feedback matrix of (seed, layer)
  // with entries uniform in [-scale, scale], generated from Philox and never stored (the rule is
  // in memkernels/reference.py); derivative (N, out_features) in e's dtype, or None.
  m.def("feedback_project(Tensor e, int seed, int layer, int out_features, float scale, Tensor? derivative) -> Tensor");
}

// The other ops are the kernels under memkernels' autograd (activation and gated, mk.elementwise,
// the compress and feedback layers), not differentiable ops themselves: called directly on a tensor
// that requires grad, their outputs get a grad_fn whose backward raises "the derivative for
// memkernels::<op> is not implemented", instead of silently giving no gradient.
TORCH_LIBRARY_IMPL(memkernels, Autograd, m) {
  for (const char* op : {"activation_forward", "activation_value", "activation_backward",
                         "activation_backward_from_input", "gated_forward", "gated_backward", "pack_bits",
                         "unpack_bits", "auxiliary_sign_forward", "quantize_groups", "dequantize_groups",
                         "weight_grad_from_codes", "feedback_project"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
