// CUDA C++ kernels of the fused activations GELU (erf), GELU (tanh) and SiLU, alone and as the
// gate of a gated linear unit: the forward writes y = f(x) and what backward keeps, f'(x) in x's
// dtype (bits == 0) or a packed k-bit code of x (bits in 1, 2, 3, 4, 8); the backward multiplies
// the incoming gradient by f'(x) or by levels[code]. memkernels/reference.py is the spec.
//
// Each thread takes one group of 8 elements at a time (a grid-stride loop over groups, int64
// indices): 8 elements are one 128-bit load for 16-bit dtypes (two for float, four for double)
// when the pointers allow it, and their codes are exactly the `bits` bytes of one group of the
// packed layout, written (or read) as one word for bits 1, 2, 4, 8 and byte by byte for bits 3.
// Borders and levels are staged in shared memory; a code is a binary search there (bits steps).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "activations.h"
#include "grad_layout.h"
#include "cuda/kernels.h"
#include "cuda/vector_io.cuh"

namespace memkernels::cuda {
namespace {

constexpr int kGroup = 8;  // elements a packed group holds
constexpr int kThreads = 256;
constexpr int kMaxTable = 256;  // levels of 8-bit codes; borders take one fewer

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluTanhCubic = 0.044715;

// ---- the math, in acc_t (float for half/bfloat16/float, double for double) ----

// torch.nan_to_num(x, posinf=big, neginf=-big) that keeps NaN: f' at +-inf is its finite limit.
template <typename T>
__device__ __forceinline__ T finite(T x, T big) {
  return std::isinf(x) ? (x > T(0) ? big : -big) : x;
}

template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <Activation A, typename T>
__device__ __forceinline__ T value_of(T x) {
  if constexpr (A == Activation::GELU) {
    return T(0.5) * x * (T(1) + std::erf(x * T(kInvSqrt2)));
  } else if constexpr (A == Activation::GELU_TANH) {
    return T(0.5) * x * (T(1) + std::tanh(T(kSqrt2OverPi) * (x + T(kGeluTanhCubic) * x * x * x)));
  } else {
    static_assert(A == Activation::SILU, "the CUDA C++ kernels cover GELU, GELU_TANH, SILU");
    return x * sigmoid(x);
  }
}

// f'(x) as reference.activation_derivative writes it; NaN stays NaN.
template <Activation A, typename T>
__device__ __forceinline__ T derivative_of(T x) {
  T d;
  if constexpr (A == Activation::GELU) {
    const T xf = finite(x, T(40));
    const T cdf = T(0.5) * (T(1) + std::erf(xf * T(kInvSqrt2)));
    const T pdf = std::exp(T(-0.5) * xf * xf) * T(kInvSqrt2Pi);
    d = cdf + xf * pdf;
  } else if constexpr (A == Activation::GELU_TANH) {
    const T xf = finite(x, T(40));
    const T t = std::tanh(T(kSqrt2OverPi) * (xf + T(kGeluTanhCubic) * xf * xf * xf));
    d = T(0.5) * (T(1) + t) + T(0.5) * xf * (T(1) - t * t) * T(kSqrt2OverPi) *
                                  (T(1) + T(3.0 * kGeluTanhCubic) * xf * xf);
  } else {
    static_assert(A == Activation::SILU, "the CUDA C++ kernels cover GELU, GELU_TANH, SILU");
    const T xf = finite(x, T(100));
    const T s = sigmoid(xf);
    d = s * (T(1) + xf * (T(1) - s));
  }
  return std::isnan(x) ? x : d;
}

// The `bits` bytes of group g as a little-endian word. packed is 8-byte aligned (see
// aligned_packed), so bits 1, 2, 4, 8 are one naturally aligned access.
__device__ __forceinline__ uint64_t load_word(const uint8_t* __restrict__ packed, int64_t g,
                                              int bits) {
  const uint8_t* src = packed + g * bits;
  switch (bits) {
    case 1: return *src;
    case 2: return *reinterpret_cast<const uint16_t*>(src);
    case 4: return *reinterpret_cast<const uint32_t*>(src);
    case 8: return *reinterpret_cast<const uint64_t*>(src);
    default: {
      uint64_t word = 0;
      for (int byte = 0; byte < bits; ++byte) word |= uint64_t(src[byte]) << (8 * byte);
      return word;
    }
  }
}

__device__ __forceinline__ void store_word(uint8_t* __restrict__ packed, int64_t g, int bits,
                                           uint64_t word) {
  uint8_t* dst = packed + g * bits;
  switch (bits) {
    case 1: *dst = static_cast<uint8_t>(word); break;
    case 2: *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(word); break;
    case 4: *reinterpret_cast<uint32_t*>(dst) = static_cast<uint32_t>(word); break;
    case 8: *reinterpret_cast<uint64_t*>(dst) = word; break;
    default:
      for (int byte = 0; byte < bits; ++byte) dst[byte] = static_cast<uint8_t>(word >> (8 * byte));
  }
}

// #{j : borders[j] < x} over 2**bits - 1 sorted borders: binary search, `bits` steps. NaN
// compares false everywhere and gets 0. x in acc_t: a float64 x is compared as it is.
template <typename acc_t>
__device__ __forceinline__ uint32_t code_of(acc_t x, const float* borders, int bits) {
  uint32_t code = 0;
  for (uint32_t half = 1u << (bits - 1); half > 0; half >>= 1) {
    if (borders[code + half - 1] < x) code += half;
  }
  return code;
}

__device__ __forceinline__ void stage_table(float* shared, const float* __restrict__ table, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) shared[i] = table[i];
}

// y = f(x) (b != nullptr: f(x) * b); deriv != nullptr: deriv = f'(x); packed != nullptr: the
// code of x among borders (bits > 0).
template <typename scalar_t, Activation A>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b,
               scalar_t* __restrict__ y, scalar_t* __restrict__ deriv, uint8_t* __restrict__ packed,
               const float* __restrict__ borders, int bits, int64_t numel, bool vec) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ float s_borders[kMaxTable];
  if (packed != nullptr) {
    stage_table(s_borders, borders, (1 << bits) - 1);
    __syncthreads();
  }
  const int64_t num_groups = (numel + kGroup - 1) / kGroup;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < num_groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t first = g * kGroup;
    acc_t xs[kGroup], out[kGroup];
    load_group(x, first, numel, vec, xs);
#pragma unroll
    for (int i = 0; i < kGroup; ++i) out[i] = value_of<A>(xs[i]);
    if (b != nullptr) {
      acc_t bs[kGroup];
      load_group(b, first, numel, vec, bs);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) out[i] *= bs[i];
    }
    store_group(y, first, numel, vec, out);
    if (deriv != nullptr) {
#pragma unroll
      for (int i = 0; i < kGroup; ++i) out[i] = derivative_of<A>(xs[i]);
      store_group(deriv, first, numel, vec, out);
    }
    if (packed != nullptr) {
      // Codes compare x, exactly, with float borders, as reference.codes does; the padding of
      // the last group gets code 0.
      uint64_t word = 0;
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        if (first + i < numel) {
          word |= uint64_t(code_of(xs[i], s_borders, bits)) << (i * bits);
        }
      }
      store_word(packed, g, bits, word);
    }
  }
}

// grad_in = g * f'; b != nullptr (gated): grad_in = g * b * f', grad_b = g * f.
// g = grad's elements, or grad[0] for every element when grad_broadcast (grad one value expanded:
// see broadcasts_one_value). bits == 0: saved is f'(x) itself, or x itself when from_input or
// gated (f, f' computed here, the only uses of A). bits > 0: f' = levels[code],
// f = value_levels[code].
template <typename scalar_t, Activation A>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const scalar_t* __restrict__ grad, bool grad_broadcast,
                const scalar_t* __restrict__ saved, const uint8_t* __restrict__ packed,
                const scalar_t* __restrict__ b, const float* __restrict__ levels,
                const float* __restrict__ value_levels, scalar_t* __restrict__ grad_in,
                scalar_t* __restrict__ grad_b, int bits, int64_t numel, bool vec, bool from_input) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ float s_levels[kMaxTable];
  __shared__ float s_value_levels[kMaxTable];
  if (packed != nullptr) {
    stage_table(s_levels, levels, 1 << bits);
    if (b != nullptr) stage_table(s_value_levels, value_levels, 1 << bits);
    __syncthreads();
  }
  const int64_t num_groups = (numel + kGroup - 1) / kGroup;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < num_groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t first = g * kGroup;
    acc_t gs[kGroup], ds[kGroup], vs[kGroup];
    if (grad_broadcast) {
      const acc_t g0 = static_cast<acc_t>(grad[0]);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) gs[i] = g0;
    } else {
      load_group(grad, first, numel, vec, gs);
    }
    if (packed != nullptr) {
      const uint64_t word = load_word(packed, g, bits);
      const uint32_t mask = (1u << bits) - 1;
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const uint32_t code = static_cast<uint32_t>(word >> (i * bits)) & mask;
        ds[i] = static_cast<acc_t>(s_levels[code]);
        if (b != nullptr) vs[i] = static_cast<acc_t>(s_value_levels[code]);
      }
    } else if (b != nullptr) {
      acc_t as[kGroup];
      load_group(saved, first, numel, vec, as);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        ds[i] = derivative_of<A>(as[i]);
        vs[i] = value_of<A>(as[i]);
      }
    } else {
      load_group(saved, first, numel, vec, ds);
      if (from_input) {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) ds[i] = derivative_of<A>(ds[i]);
      }
    }
    if (b != nullptr) {
      acc_t bs[kGroup];
      load_group(b, first, numel, vec, bs);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        bs[i] = gs[i] * bs[i] * ds[i];
        vs[i] = gs[i] * vs[i];
      }
      store_group(grad_in, first, numel, vec, bs);
      store_group(grad_b, first, numel, vec, vs);
    } else {
      // A zero level is a zero gradient, inf or NaN in g too (torch's ReLU backward).
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        ds[i] = (packed != nullptr && ds[i] == acc_t(0)) ? acc_t(0) : gs[i] * ds[i];
      }
      store_group(grad_in, first, numel, vec, ds);
    }
  }
}

// ---- host side ----

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// Calls f(ActivationTag<A>{}) for the activation id; the CUDA C++ kernels cover the gates only.
template <typename F>
void dispatch_activation(int64_t activation, const char* op, F&& f) {
  switch (activation) {
    case static_cast<int64_t>(Activation::GELU): return f(ActivationTag<Activation::GELU>{});
    case static_cast<int64_t>(Activation::GELU_TANH):
      return f(ActivationTag<Activation::GELU_TANH>{});
    case static_cast<int64_t>(Activation::SILU): return f(ActivationTag<Activation::SILU>{});
    default:
      TORCH_CHECK(false, op, " (CUDA C++): activation must be GELU (", int64_t(Activation::GELU),
                  "), GELU_TANH (", int64_t(Activation::GELU_TANH), ") or SILU (",
                  int64_t(Activation::SILU), "), got ", activation,
                  "; the Triton kernels (memkernels.triton) cover every activation");
  }
}

void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like,
                const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.sizes() == like.sizes(), name, " (",
              t.scalar_type(), ", ", t.sizes(), ") must match ", like_name, " (",
              like.scalar_type(), ", ", like.sizes(), ")");
}

void check_bits(int64_t bits, bool exact_ok) {
  TORCH_CHECK((exact_ok && bits == 0) || valid_bits(bits), "bits must be ",
              exact_ok ? "0, " : "", "1, 2, 3, 4 or 8, got ", bits);
}

// borders (2**bits - 1) or levels (2**bits): float32, 1-D, on the device of `like`.
const at::Tensor& check_table(const std::optional<at::Tensor>& table, const char* name,
                              int64_t length, int64_t bits, const at::Tensor& like) {
  TORCH_CHECK(table.has_value() && table->defined(), name, " is required when bits = ", bits);
  TORCH_CHECK(table->scalar_type() == at::kFloat && table->dim() == 1 && table->numel() == length,
              name, " must be a 1-D float32 tensor of ", length, " values for bits=", bits,
              ", got ", table->scalar_type(), " of shape ", table->sizes());
  TORCH_CHECK(table->device() == like.device(), name, " is on ", table->device(), " but ",
              "the input is on ", like.device());
  return *table;
}

void check_packed(const at::Tensor& packed, const char* name, int64_t numel, int64_t bits,
                  const at::Tensor& like) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, name, " must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.numel() == packed_nbytes(numel, bits), name,
              " must hold ceil(numel / 8) * bits = ", packed_nbytes(numel, bits),
              " bytes for numel=", numel, ", bits=", bits, "; got ", packed.numel());
  TORCH_CHECK(packed.device() == like.device(), name, " is on ", packed.device(), " but ",
              "the input is on ", like.device());
}

// Contiguous and 8-byte aligned: kernels read a group's bytes as one word.
at::Tensor aligned_packed(const at::Tensor& packed) {
  at::Tensor p = packed.contiguous();
  return reinterpret_cast<uintptr_t>(p.data_ptr()) % 8 == 0 ? p : p.clone();
}

// Enough blocks to fill the device; the grid-stride loop covers the rest.
int num_blocks(int64_t numel) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  return static_cast<int>(std::min<int64_t>((groups + kThreads - 1) / kThreads, int64_t(sms) * 8));
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* mutable_ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr;
}

// y = f(x) (b defined: f(x) * b) and, into whichever is defined, deriv = f'(x) or the packed code.
void launch_forward(const at::Tensor& x, const at::Tensor& b, at::Tensor& y, at::Tensor& deriv,
                    at::Tensor& packed, const at::Tensor& borders, int64_t activation, int64_t bits,
                    const char* op) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "activation_fwd", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = ptr_or_null<scalar_t>(b);
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    scalar_t* deriv_ptr = mutable_ptr_or_null<scalar_t>(deriv);
    const bool vec = vector_aligned({x_ptr, b_ptr, y_ptr, deriv_ptr}, sizeof(Group<scalar_t, kGroup>));
    uint8_t* packed_ptr = packed.defined() ? packed.mutable_data_ptr<uint8_t>() : nullptr;
    const float* borders_ptr = borders.defined() ? borders.const_data_ptr<float>() : nullptr;
    dispatch_activation(activation, op, [&](auto tag) {
      forward_kernel<scalar_t, decltype(tag)::value><<<num_blocks(numel), kThreads, 0, stream>>>(
          x_ptr, b_ptr, y_ptr, deriv_ptr, packed_ptr, borders_ptr, static_cast<int>(bits), numel,
          vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// grad_in = g * f' (b defined: grad_in = g * b * f', grad_b = g * f). `saved` is f', or x
// (from_input) or a (gated) with bits == 0, or the packed code; grad is contiguous or broadcasts
// one value. Only bits == 0 from x or a needs the activation.
void launch_backward(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& b,
                     const at::Tensor& levels, const at::Tensor& value_levels, at::Tensor& grad_in,
                     at::Tensor& grad_b, int64_t activation, int64_t bits, bool from_input,
                     const char* op) {
  const int64_t numel = grad.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "activation_bwd",
                                  [&] {
    const bool grad_broadcast = broadcasts_one_value(grad);
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    const scalar_t* saved_ptr = bits == 0 ? saved.const_data_ptr<scalar_t>() : nullptr;
    const uint8_t* packed_ptr = bits == 0 ? nullptr : saved.const_data_ptr<uint8_t>();
    const scalar_t* b_ptr = ptr_or_null<scalar_t>(b);
    scalar_t* grad_in_ptr = grad_in.mutable_data_ptr<scalar_t>();
    scalar_t* grad_b_ptr = mutable_ptr_or_null<scalar_t>(grad_b);
    const bool vec = vector_aligned({grad_broadcast ? nullptr : grad_ptr, saved_ptr, b_ptr,
                                     grad_in_ptr, grad_b_ptr},
                                    sizeof(Group<scalar_t, kGroup>));
    const float* levels_ptr = levels.defined() ? levels.const_data_ptr<float>() : nullptr;
    const float* value_levels_ptr =
        value_levels.defined() ? value_levels.const_data_ptr<float>() : nullptr;
    auto launch = [&](auto tag) {
      backward_kernel<scalar_t, decltype(tag)::value><<<num_blocks(numel), kThreads, 0, stream>>>(
          grad_ptr, grad_broadcast, saved_ptr, packed_ptr, b_ptr, levels_ptr, value_levels_ptr,
          grad_in_ptr, grad_b_ptr, static_cast<int>(bits), numel, vec, from_input);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if ((b.defined() || from_input) && bits == 0) {
      dispatch_activation(activation, op, launch);
    } else {
      launch(ActivationTag<Activation::GELU>{});  // the activation is not used: any instance
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> activation_forward(const at::Tensor& x_in, int64_t activation,
                                                      double p0, double p1, int64_t bits,
                                                      const std::optional<at::Tensor>& borders) {
  // GELU, GELU-tanh and SiLU take no parameters: p0, p1 are part of the op's schema only.
  (void)p0;
  (void)p1;
  check_float_input(x_in, "x");
  check_bits(bits, /*exact_ok=*/true);
  dispatch_activation(activation, "activation_forward", [](auto) {});
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor deriv, packed, table;
  if (bits == 0) {
    deriv = at::empty(x.sizes(), x.options());
  } else {
    table = check_table(borders, "borders", (int64_t(1) << bits) - 1, bits, x).contiguous();
    packed = at::empty({packed_nbytes(x.numel(), bits)}, x.options().dtype(at::kByte));
  }
  launch_forward(x, at::Tensor(), y, deriv, packed, table, activation, bits, "activation_forward");
  return {y, bits == 0 ? deriv : packed};
}

at::Tensor activation_value(const at::Tensor& x_in, int64_t activation, double p0, double p1) {
  (void)p0;
  (void)p1;
  check_float_input(x_in, "x");
  dispatch_activation(activation, "activation_value", [](auto) {});
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor no_deriv, no_packed;
  launch_forward(x, at::Tensor(), y, no_deriv, no_packed, at::Tensor(), activation, 0,
                 "activation_value");
  return y;
}

at::Tensor activation_backward(const at::Tensor& grad_in_arg, const at::Tensor& saved_in,
                               int64_t bits, const std::optional<at::Tensor>& levels) {
  check_float_input(grad_in_arg, "grad_out");
  check_bits(bits, /*exact_ok=*/true);
  const at::Tensor grad =
      broadcasts_one_value(grad_in_arg) ? grad_in_arg : grad_in_arg.contiguous();
  at::Tensor saved, table;
  if (bits == 0) {
    check_like(saved_in, "saved", grad, "grad_out");
    saved = saved_in.contiguous();
  } else {
    check_packed(saved_in, "saved", grad.numel(), bits, grad);
    table = check_table(levels, "levels", int64_t(1) << bits, bits, grad).contiguous();
    saved = aligned_packed(saved_in);
  }
  at::Tensor grad_in = at::empty(grad.sizes(), grad.options());
  at::Tensor no_grad_b;
  launch_backward(grad, saved, at::Tensor(), table, at::Tensor(), grad_in, no_grad_b,
                  static_cast<int64_t>(Activation::GELU), bits, /*from_input=*/false,
                  "activation_backward");
  return grad_in;
}

at::Tensor activation_backward_from_input(const at::Tensor& grad_out, const at::Tensor& x_in,
                                          int64_t activation, double p0, double p1) {
  (void)p0;
  (void)p1;
  check_float_input(grad_out, "grad_out");
  check_like(x_in, "x", grad_out, "grad_out");
  dispatch_activation(activation, "activation_backward_from_input", [](auto) {});
  const at::Tensor grad = broadcasts_one_value(grad_out) ? grad_out : grad_out.contiguous();
  const at::Tensor x = x_in.contiguous();
  at::Tensor grad_in = at::empty(grad.sizes(), grad.options());
  at::Tensor no_grad_b;
  launch_backward(grad, x, at::Tensor(), at::Tensor(), at::Tensor(), grad_in, no_grad_b,
                  activation, 0, /*from_input=*/true, "activation_backward_from_input");
  return grad_in;
}

std::tuple<at::Tensor, at::Tensor> gated_forward(const at::Tensor& a_in, const at::Tensor& b_in,
                                                 int64_t activation, int64_t bits,
                                                 const std::optional<at::Tensor>& borders) {
  check_float_input(a_in, "a");
  check_like(b_in, "b", a_in, "a");
  check_bits(bits, /*exact_ok=*/true);
  dispatch_activation(activation, "gated_forward", [](auto) {});
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  at::Tensor y = at::empty(a.sizes(), a.options());
  at::Tensor no_deriv, table;
  at::Tensor code = at::empty({bits == 0 ? 0 : packed_nbytes(a.numel(), bits)},
                              a.options().dtype(at::kByte));
  at::Tensor packed;
  if (bits > 0) {
    table = check_table(borders, "borders", (int64_t(1) << bits) - 1, bits, a).contiguous();
    packed = code;
  }
  launch_forward(a, b, y, no_deriv, packed, table, activation, bits, "gated_forward");
  return {y, code};
}

std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& grad_out,
                                                  const at::Tensor& saved_a, const at::Tensor& b_in,
                                                  int64_t activation, int64_t bits,
                                                  const std::optional<at::Tensor>& levels,
                                                  const std::optional<at::Tensor>& value_levels) {
  check_float_input(grad_out, "grad_out");
  check_like(b_in, "b", grad_out, "grad_out");
  check_bits(bits, /*exact_ok=*/true);
  dispatch_activation(activation, "gated_backward", [](auto) {});
  const at::Tensor grad = broadcasts_one_value(grad_out) ? grad_out : grad_out.contiguous();
  const at::Tensor b = b_in.contiguous();
  at::Tensor saved, table, value_table;
  if (bits == 0) {
    check_like(saved_a, "saved_a", grad, "grad_out");
    saved = saved_a.contiguous();
  } else {
    check_packed(saved_a, "saved_a", grad.numel(), bits, grad);
    table = check_table(levels, "levels", int64_t(1) << bits, bits, grad).contiguous();
    value_table =
        check_table(value_levels, "value_levels", int64_t(1) << bits, bits, grad).contiguous();
    saved = aligned_packed(saved_a);
  }
  at::Tensor grad_a = at::empty(grad.sizes(), grad.options());
  at::Tensor grad_b = at::empty(grad.sizes(), grad.options());
  launch_backward(grad, saved, b, table, value_table, grad_a, grad_b, activation, bits,
                  /*from_input=*/false, "gated_backward");
  return {grad_a, grad_b};
}

}  // namespace memkernels::cuda
