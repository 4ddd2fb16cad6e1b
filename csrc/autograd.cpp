// Autograd of the differentiable ops memkernels::activation and memkernels::gated (schemas in
// ops.cpp, reference in memkernels/reference.py): C++ nodes around the kernel ops, so that a
// forward and backward run no Python beyond the call itself (a Python autograd.Function adds host
// time to every call, and on CUDA runs Python on autograd's device thread). The kernels are reached
// through the dispatcher: CPU, CUDA (Triton or CUDA C++) and fake kernels alike.
//
// What backward keeps is exactly what the kernel ops return for it (f'(x), its packed code) or x or
// y, saved as tensors; the tables (levels) are shared constants of a few hundred bytes and travel in
// saved_data, which saved-tensor hooks do not see, so the bytes that autograd keeps per call are the
// activation's alone.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "activations.h"
#include "autograd.h"

namespace memkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

// Set from Python (memkernels.ops) to memkernels.activations.spec.SECOND_DERIVATIVE_ERROR, the one
// text of this error for the C++ nodes and the Python ones (mk.elementwise, the fallback).
std::string& second_derivative_error() {
  static std::string message = "memkernels' fused activations have no second derivative";
  return message;
}

// The backward of these nodes (but Keep::kTorch's, which is torch's) multiplies by the kept f'(x),
// which has no f'' in it: with create_graph=True (the engine runs backward in grad mode exactly
// then) a gradient of it would silently miss the f''(x) term, so it raises instead.
void check_no_second_derivative() {
  TORCH_CHECK(!at::GradMode::is_enabled(), second_derivative_error());
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::tuple<at::Tensor, at::Tensor> activation_forward(const at::Tensor& x, int64_t act, double p0, double p1,
                                                      int64_t bits, const OptionalTensor& borders) {
  static const auto op = kernel_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, int64_t, double, double, int64_t, const OptionalTensor&)>("memkernels::activation_forward");
  return op.call(x, act, p0, p1, bits, borders);
}

at::Tensor activation_value(const at::Tensor& x, int64_t act, double p0, double p1) {
  static const auto op =
      kernel_op<at::Tensor(const at::Tensor&, int64_t, double, double)>("memkernels::activation_value");
  return op.call(x, act, p0, p1);
}

at::Tensor activation_backward(const at::Tensor& grad_out, const at::Tensor& saved, int64_t bits,
                               const OptionalTensor& levels) {
  static const auto op = kernel_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptionalTensor&)>(
      "memkernels::activation_backward");
  return op.call(grad_out, saved, bits, levels);
}

at::Tensor activation_backward_from_input(const at::Tensor& grad_out, const at::Tensor& x, int64_t act, double p0,
                                          double p1) {
  static const auto op = kernel_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double, double)>(
      "memkernels::activation_backward_from_input");
  return op.call(grad_out, x, act, p0, p1);
}

at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, int64_t numel) {
  static const auto op =
      kernel_op<at::Tensor(const at::Tensor&, int64_t, int64_t)>("memkernels::unpack_bits");
  return op.call(packed, bits, numel);
}

std::tuple<at::Tensor, at::Tensor> gated_forward(const at::Tensor& a, const at::Tensor& b, int64_t act, int64_t bits,
                                                 const OptionalTensor& borders) {
  static const auto op = kernel_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, int64_t, int64_t, const OptionalTensor&)>("memkernels::gated_forward");
  return op.call(a, b, act, bits, borders);
}

std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& grad_out, const at::Tensor& saved_a,
                                                  const at::Tensor& b, int64_t act, int64_t bits,
                                                  const OptionalTensor& levels, const OptionalTensor& value_levels) {
  static const auto op = kernel_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, const OptionalTensor&,
      const OptionalTensor&)>("memkernels::gated_backward");
  return op.call(grad_out, saved_a, b, act, bits, levels, value_levels);
}

// What memkernels::activation keeps for backward (Keep in memkernels/activations/spec.py).
enum class Keep : int64_t {
  kDerivative = 0,  // activation_forward's saved: f'(x) or its packed code
  kInput = 1,       // x; f'(x) recomputed by activation_backward_from_input
  kTorch = 2,       // what torch keeps (Sigmoid, Tanh: y; Hardswish: x); backward torch's own op
};

bool keeps_output(int64_t act) {
  return act == static_cast<int64_t>(Activation::SIGMOID) || act == static_cast<int64_t>(Activation::TANH);
}

// torch's backward of the activations that Keep::kTorch serves: differentiable ops, so this backward
// is twice differentiable, as torch's is (a kept y comes back with this node as its grad_fn).
at::Tensor torch_backward(int64_t act, const at::Tensor& grad_out, const at::Tensor& kept) {
  switch (static_cast<Activation>(act)) {
    case Activation::SIGMOID:
      return at::sigmoid_backward(grad_out, kept);
    case Activation::TANH:
      return at::tanh_backward(grad_out, kept);
    default:
      return at::hardswish_backward(grad_out, kept);
  }
}

struct ActivationFunction : public torch::autograd::Function<ActivationFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t act, double p0, double p1,
                            int64_t bits, int64_t keep, const OptionalTensor& borders, const OptionalTensor& levels) {
    TORCH_CHECK(keep >= 0 && keep <= 2, "keep must be 0 (f'(x) or its code), 1 (x) or 2 (what torch keeps), got ", keep);
    TORCH_CHECK(static_cast<Keep>(keep) != Keep::kTorch || keeps_output(act) ||
                    act == static_cast<int64_t>(Activation::HARDSWISH),
                "keep = 2 (torch's backward) serves Sigmoid, Tanh and Hardswish, got activation id ", act);
    ctx->saved_data["act"] = act;
    ctx->saved_data["p0"] = p0;
    ctx->saved_data["p1"] = p1;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["keep"] = keep;
    ctx->saved_data["levels"] = levels;
    if (static_cast<Keep>(keep) == Keep::kDerivative) {
      auto [y, saved] = activation_forward(x, act, p0, p1, bits, borders);
      ctx->save_for_backward({saved});
      return y;
    }
    at::Tensor y = activation_value(x, act, p0, p1);
    ctx->save_for_backward({static_cast<Keep>(keep) == Keep::kTorch && keeps_output(act) ? y : x});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    const at::Tensor kept = ctx->get_saved_variables()[0];
    const int64_t act = ctx->saved_data["act"].toInt();
    const double p0 = ctx->saved_data["p0"].toDouble();
    const auto keep = static_cast<Keep>(ctx->saved_data["keep"].toInt());
    if (keep != Keep::kTorch) {
      check_no_second_derivative();
    }
    at::Tensor grad_in;
    if (keep == Keep::kTorch) {
      grad_in = torch_backward(act, grad_out, kept);
    } else if (keep == Keep::kInput) {
      grad_in = activation_backward_from_input(grad_out, kept, act, p0, ctx->saved_data["p1"].toDouble());
    } else if (act == static_cast<int64_t>(Activation::LEAKY_RELU) && grad_out.scalar_type() == at::kDouble) {
      // In float64 the slope multiplies at full precision, as torch's leaky_relu_backward does:
      // the 1-bit code says x > 0, and a float32 level would round the slope.
      const at::Tensor positive = unpack_bits(kept, 1, grad_out.numel()).view(grad_out.sizes()).to(at::kBool);
      grad_in = at::where(positive, grad_out, grad_out * p0);
    } else {
      grad_in = activation_backward(grad_out, kept, ctx->saved_data["bits"].toInt(),
                                    ctx->saved_data["levels"].toOptional<at::Tensor>());
    }
    return {grad_in, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

struct GatedFunction : public torch::autograd::Function<GatedFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b, int64_t act,
                            int64_t bits, bool copy_b, const OptionalTensor& borders, const OptionalTensor& levels,
                            const OptionalTensor& value_levels) {
    ctx->saved_data["act"] = act;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["levels"] = levels;
    ctx->saved_data["value_levels"] = value_levels;
    auto [y, code] = gated_forward(a, b, act, bits, borders);
    // With a code kept instead of a, a b that views a larger tensor (b of chunk([a, b])) would keep
    // all of it alive, a's half too: a copy keeps b's own bytes.
    const at::Tensor kept_b = bits != 0 && copy_b ? b.clone(at::MemoryFormat::Contiguous) : b;
    ctx->save_for_backward({bits == 0 ? a : code, kept_b});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_no_second_derivative();
    const variable_list kept = ctx->get_saved_variables();
    auto [grad_a, grad_b] =
        gated_backward(grads[0], kept[0], kept[1], ctx->saved_data["act"].toInt(), ctx->saved_data["bits"].toInt(),
                       ctx->saved_data["levels"].toOptional<at::Tensor>(),
                       ctx->saved_data["value_levels"].toOptional<at::Tensor>());
    return {grad_a, grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor activation_autograd(const at::Tensor& x, int64_t act, double p0, double p1, int64_t bits, int64_t keep,
                               const OptionalTensor& borders, const OptionalTensor& levels) {
  return ActivationFunction::apply(x, act, p0, p1, bits, keep, borders, levels);
}

at::Tensor gated_autograd(const at::Tensor& a, const at::Tensor& b, int64_t act, int64_t bits, bool copy_b,
                          const OptionalTensor& borders, const OptionalTensor& levels,
                          const OptionalTensor& value_levels) {
  return GatedFunction::apply(a, b, act, bits, copy_b, borders, levels, value_levels);
}

// Below autograd (inference-mode tensors, a call with autograd already handled): the forward values
// alone, nothing kept.
// (activation_value's values are activation_forward's bit for bit.)
at::Tensor activation_without_grad(const at::Tensor& x, int64_t act, double p0, double p1, int64_t /*bits*/,
                                   int64_t /*keep*/, const OptionalTensor& /*borders*/,
                                   const OptionalTensor& /*levels*/) {
  return activation_value(x, act, p0, p1);
}

at::Tensor gated_without_grad(const at::Tensor& a, const at::Tensor& b, int64_t act, int64_t /*bits*/,
                              bool /*copy_b*/, const OptionalTensor& /*borders*/, const OptionalTensor& /*levels*/,
                              const OptionalTensor& /*value_levels*/) {
  return std::get<0>(gated_forward(a, b, act, 0, std::nullopt));
}

}  // namespace

void set_second_derivative_error(const std::string& message) { second_derivative_error() = message; }

TORCH_LIBRARY_IMPL(memkernels, Autograd, m) {
  m.impl("activation", &activation_autograd);
  m.impl("gated", &gated_autograd);
}

TORCH_LIBRARY_IMPL(memkernels, CompositeExplicitAutograd, m) {
  m.impl("activation", &activation_without_grad);
  m.impl("gated", &gated_without_grad);
}

}  // namespace memkernels
