// CPU kernels of the fused activations: activation_forward/value/backward(_from_input) and
// gated_forward/backward (schemas in csrc/ops.cpp, semantics in memkernels/reference.py): the
// argument checks and the outputs here, the kernels of this CPU's instruction set in
// activation_kernels_impl.h.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <strings.h>

#include <cstdint>
#include <cstdlib>

#include "activations.h"
#include "grad_layout.h"
#include "cpu/activation_kernels.h"
#include "cpu/checks.h"

namespace memkernels::cpu {

namespace {

struct PickedKernels {
  const char* isa;
  const ActivationKernels* kernels;
};

// ATen's choice (AVX512 or AVX2), and within AVX512 the AVX512-BF16 build where the CPU has it,
// unless ATEN_CPU_CAPABILITY holds ATen to plain avx512: then these kernels too.
const PickedKernels& picked_kernels() {
  static const PickedKernels picked = []() -> PickedKernels {
    if (at::get_cpu_capability() != "AVX512") {
      return {"AVX2", &AVX2::kActivationKernels};
    }
    const char* held = std::getenv("ATEN_CPU_CAPABILITY");
    if (__builtin_cpu_supports("avx512bf16") && (held == nullptr || strcasecmp(held, "avx512") != 0)) {
      return {"AVX512_BF16", &AVX512_BF16::kActivationKernels};
    }
    return {"AVX512", &AVX512::kActivationKernels};
  }();
  return picked;
}

}  // namespace

const ActivationKernels& activation_kernels() { return *picked_kernels().kernels; }

const char* activation_kernels_isa() { return picked_kernels().isa; }

namespace {

// ---- argument checks ----

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 0 || valid_bits(bits), "bits must be 0 (exact) or one of 1, 2, 3, 4, 8, got ", bits);
}

Activation check_activation(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, "activation must be an id in [0, ",
              kNumActivations, ") (memkernels.activations.spec.Activation), got ", activation);
  return static_cast<Activation>(activation);
}

Activation check_gate(int64_t activation) {
  const Activation act = check_activation(activation);
  TORCH_CHECK(act == Activation::SILU || act == Activation::GELU || act == Activation::GELU_TANH,
              "activation of a gated unit must be SILU, GELU or GELU_TANH, got id ", activation);
  return act;
}

// A float32 table (borders, levels, value_levels) of `size` values, on the device of `like`.
at::Tensor check_table(const std::optional<at::Tensor>& table, const char* name, int64_t size, int64_t bits,
                       const at::Tensor& like) {
  TORCH_CHECK(table.has_value(), name, " must be given when bits > 0 (bits = ", bits, ")");
  TORCH_CHECK(table->scalar_type() == at::kFloat, name, " must be float32, got ", table->scalar_type());
  TORCH_CHECK(table->device() == like.device(), name, " must be on ", like.device(), ", got ", table->device());
  TORCH_CHECK(table->numel() == size, name, " must have 2**bits", size % 2 ? " - 1" : "", " = ", size,
              " values for bits = ", bits, ", got ", table->numel());
  return table->contiguous();
}

// Saved codes: uint8 of packed_nbytes(numel, bits) bytes.
at::Tensor check_codes(const at::Tensor& codes, const char* name, int64_t numel, int64_t bits,
                       const at::Tensor& like) {
  TORCH_CHECK(codes.scalar_type() == at::kByte, name, " must be the uint8 packed code when bits > 0, got ",
              codes.scalar_type());
  TORCH_CHECK(codes.device() == like.device(), name, " must be on ", like.device(), ", got ", codes.device());
  TORCH_CHECK(codes.numel() == packed_nbytes(numel, bits), name, " must hold ceil(numel / 8) * bits = ",
              packed_nbytes(numel, bits), " bytes for ", numel, " elements at bits = ", bits, ", got ",
              codes.numel());
  return codes.contiguous();
}

// What forward kept, contiguous: f'(x) shaped and typed like grad_out (bits == 0) or its code.
at::Tensor check_saved(const at::Tensor& saved, const char* name, int64_t bits, const at::Tensor& grad_out) {
  if (bits == 0) {
    check_like(saved, name, grad_out, "grad_out");
    return saved.contiguous();
  }
  return check_codes(saved, name, grad_out.numel(), bits, grad_out);
}

// A contiguous output shaped like `like`, from torch's CPU allocator under its own page policy:
// THP_MEM_ALLOC_ENABLE=1 (torch's switch) gives torch's outputs and these transparent huge pages
// alike. Not asked for here alone: that timed 2 MB page faults against torch's 4 KB ones, and on a
// virtual machine huge pages fault in 3-4x slower on some calls than on others.
at::Tensor empty_output(const at::Tensor& like) { return at::empty_like(like, at::MemoryFormat::Contiguous); }

at::Tensor empty_codes(int64_t numel, int64_t bits, const at::Tensor& like) {
  return at::empty({packed_nbytes(numel, bits)}, like.options().dtype(at::kByte));
}

// grad_out as the backward kernels take it: itself when it broadcasts one value, else contiguous.
at::Tensor kernel_grad_out(const at::Tensor& grad_out, bool broadcast) {
  return broadcast ? grad_out : grad_out.contiguous();
}

// ---- ops ----

std::tuple<at::Tensor, at::Tensor> activation_forward(const at::Tensor& x_in, int64_t activation, double p0,
                                                      double p1, int64_t bits,
                                                      const std::optional<at::Tensor>& borders_in) {
  check_floating(x_in, "x");
  const Activation act = check_activation(activation);
  check_bits(bits);
  at::Tensor borders;
  if (bits > 0) {
    borders = check_table(borders_in, "borders", (int64_t{1} << bits) - 1, bits, x_in);
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output(x);
  at::Tensor saved = bits == 0 ? empty_output(x) : empty_codes(x.numel(), bits, x);
  activation_kernels().forward(act, x, p0, p1, bits, borders, y, saved);
  return {y, saved};
}

// y = f(x) alone, for calls that no gradient can need: the same kernel as activation_forward
// (so the same values, bit for bit), without writing f'(x) or a code.
at::Tensor activation_value(const at::Tensor& x_in, int64_t activation, double p0, double p1) {
  check_floating(x_in, "x");
  const Activation act = check_activation(activation);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output(x);
  activation_kernels().forward(act, x, p0, p1, 0, at::Tensor(), y, at::Tensor());
  return y;
}

std::tuple<at::Tensor, at::Tensor> gated_forward(const at::Tensor& a_in, const at::Tensor& b_in, int64_t activation,
                                                 int64_t bits, const std::optional<at::Tensor>& borders_in) {
  check_floating(a_in, "a");
  check_like(b_in, "b", a_in, "a");
  const Activation act = check_gate(activation);
  check_bits(bits);
  at::Tensor borders;
  if (bits > 0) {
    borders = check_table(borders_in, "borders", (int64_t{1} << bits) - 1, bits, a_in);
  }
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor y = empty_output(a);
  at::Tensor codes = bits == 0 ? at::empty({0}, a.options().dtype(at::kByte)) : empty_codes(a.numel(), bits, a);
  activation_kernels().gated_forward(act, a, b, bits, borders, y, codes);
  return {y, codes};
}

at::Tensor activation_backward(const at::Tensor& grad_out_in, const at::Tensor& saved_in, int64_t bits,
                               const std::optional<at::Tensor>& levels_in) {
  check_floating(grad_out_in, "grad_out");
  check_bits(bits);
  const at::Tensor saved = check_saved(saved_in, "saved", bits, grad_out_in);
  at::Tensor levels;
  if (bits > 0) {
    levels = check_table(levels_in, "levels", int64_t{1} << bits, bits, grad_out_in);
  }
  const bool broadcast = broadcasts_one_value(grad_out_in);
  const at::Tensor grad_out = kernel_grad_out(grad_out_in, broadcast);
  at::Tensor grad_in = empty_output(grad_out);
  activation_kernels().backward(grad_out, broadcast, saved, bits, levels, grad_in);
  return grad_in;
}

at::Tensor activation_backward_from_input(const at::Tensor& grad_out_in, const at::Tensor& x_in, int64_t activation,
                                          double p0, double p1) {
  check_floating(grad_out_in, "grad_out");
  check_like(x_in, "x", grad_out_in, "grad_out");
  const Activation act = check_activation(activation);
  const bool broadcast = broadcasts_one_value(grad_out_in);
  const at::Tensor grad_out = kernel_grad_out(grad_out_in, broadcast), x = x_in.contiguous();
  at::Tensor grad_in = empty_output(grad_out);
  activation_kernels().backward_from_input(act, grad_out, broadcast, x, p0, p1, grad_in);
  return grad_in;
}

std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& grad_out_in, const at::Tensor& saved_a_in,
                                                  const at::Tensor& b_in, int64_t activation, int64_t bits,
                                                  const std::optional<at::Tensor>& levels_in,
                                                  const std::optional<at::Tensor>& value_levels_in) {
  check_floating(grad_out_in, "grad_out");
  check_like(b_in, "b", grad_out_in, "grad_out");
  const Activation act = check_gate(activation);
  check_bits(bits);
  const at::Tensor saved_a = check_saved(saved_a_in, "saved_a", bits, grad_out_in);
  at::Tensor levels, value_levels;
  if (bits > 0) {
    levels = check_table(levels_in, "levels", int64_t{1} << bits, bits, grad_out_in);
    value_levels = check_table(value_levels_in, "value_levels", int64_t{1} << bits, bits, grad_out_in);
  }
  const bool broadcast = broadcasts_one_value(grad_out_in);
  const at::Tensor grad_out = kernel_grad_out(grad_out_in, broadcast), b = b_in.contiguous();
  at::Tensor grad_a = empty_output(grad_out);
  at::Tensor grad_b = empty_output(grad_out);
  activation_kernels().gated_backward(act, grad_out, broadcast, saved_a, b, bits, levels, value_levels, grad_a,
                                      grad_b);
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(memkernels, CPU, m) {
  m.impl("activation_forward", &activation_forward);
  m.impl("activation_value", &activation_value);
  m.impl("activation_backward", &activation_backward);
  m.impl("activation_backward_from_input", &activation_backward_from_input);
  m.impl("gated_forward", &gated_forward);
  m.impl("gated_backward", &gated_backward);
}

}  // namespace memkernels::cpu
