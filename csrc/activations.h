// Activation ids and scalar math shared by the CPU and CUDA kernels.
// The ids match memkernels/activations/spec.py (Activation); the math matches
// memkernels/reference.py (activation_value / activation_derivative), in float.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MK_HOST_DEVICE inline
#endif

namespace memkernels {

enum class Activation : int64_t {
  RELU = 0,
  LEAKY_RELU = 1,  // p0 = negative_slope
  GELU = 2,
  GELU_TANH = 3,
  SILU = 4,
  MISH = 5,
  SOFTPLUS = 6,  // p0 = beta, p1 = threshold
  ELU = 7,       // p0 = alpha
  SELU = 8,
  CELU = 9,  // p0 = alpha
  SIGMOID = 10,
  TANH = 11,
  HARDSWISH = 12,
  HARDSIGMOID = 13,
};
constexpr int64_t kNumActivations = 14;

// Codes count the borders below x, except Hardsigmoid's, which count those below -|x|: its
// two-valued f' (1/6 on (-3, 3); 0 outside, at +-3 and at NaN) is then one border, -3, and one
// exact bit (CODES_NEGATED_MAGNITUDE in spec.py).
template <Activation A>
constexpr bool kCodesNegatedMagnitude = A == Activation::HARDSIGMOID;

constexpr float kSeluAlpha = 1.6732632423543772848170429916717f;
constexpr float kSeluScale = 1.0507009873554804934193349852946f;

constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
// The same in double, for the generic math below: T(constant) then rounds once to T, as the
// reference's Python floats do, and float64 kernels keep full precision.
constexpr double kSeluAlphaD = 1.6732632423543772848170429916717;
constexpr double kSeluScaleD = 1.0507009873554804934193349852946;
constexpr double kSqrt1_2D = 0.70710678118654752440;
constexpr double kInvSqrt2PiD = 0.39894228040143267794;
constexpr double kSqrt2OverPiD = 0.79788456080286535588;

// Bits of the packed codes: groups of 8 elements take `bits` bytes (see reference.py).
MK_HOST_DEVICE bool valid_bits(int64_t bits) {
  return bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8;
}
MK_HOST_DEVICE int64_t packed_nbytes(int64_t numel, int64_t bits) { return (numel + 7) / 8 * bits; }

// The math of every activation, written once for any number-like T: float or double on host and
// device (ScalarMath below) and ATen's Vectorized<float/double> on CPU (cpu/vec_math.h). M supplies
// exp, expm1, log1p, erf_with_gauss, tanh, the comparisons lt, le, gt and isnan (false with NaN,
// but isnan; each gives M's mask type), where(mask, a, b) and clamp(x, lo, hi).
// The order of operations follows memkernels/reference.py so that float results agree with it.
template <typename T>
struct ScalarMath {
  static MK_HOST_DEVICE T exp(T x) { return std::exp(x); }
  static MK_HOST_DEVICE T expm1(T x) { return std::expm1(x); }
  static MK_HOST_DEVICE T log1p(T x) { return std::log1p(x); }
  // erf(z) given gauss = exp(-z * z), for policies whose erf is built on that exp (FloatVecMath).
  static MK_HOST_DEVICE T erf_with_gauss(T z, T /*gauss*/) { return std::erf(z); }
  static MK_HOST_DEVICE T tanh(T x) { return std::tanh(x); }
  static MK_HOST_DEVICE bool lt(T a, T b) { return a < b; }
  static MK_HOST_DEVICE bool le(T a, T b) { return a <= b; }
  static MK_HOST_DEVICE bool gt(T a, T b) { return a > b; }
  static MK_HOST_DEVICE bool isnan(T x) { return x != x; }
  static MK_HOST_DEVICE T where(bool mask, T a, T b) { return mask ? a : b; }
  // clamp that lets NaN through, as torch.clamp does.
  static MK_HOST_DEVICE T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
};

namespace math {
// exp(-z * z): GELU's f and f' both need it (inside erf, and as the Gaussian density), so both
// write it the same way and a kernel computing the two computes it once.
template <typename M, typename T>
MK_HOST_DEVICE T gauss(T z) {
  return M::exp(T(0) - z * z);
}
template <typename M, typename T>
MK_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + M::exp(T(0) - x));
}
// torch.nn.functional.softplus at its defaults (beta 1, threshold 20).
template <typename M, typename T>
MK_HOST_DEVICE T softplus(T x) {
  return M::where(M::gt(x, T(20)), x, M::log1p(M::exp(x)));
}

}  // namespace math

// f(x). p0, p1: the activation's parameters (see Activation); unused ones are ignored.
template <Activation A, typename M, typename T>
MK_HOST_DEVICE T activation_value_of(T x, T p0, T p1) {
  if constexpr (A == Activation::RELU) {
    // x < 0, not x <= 0: -0.0 and NaN (not < 0) pass through as torch's relu passes them.
    return M::where(M::lt(x, T(0)), T(0), x);
  } else if constexpr (A == Activation::LEAKY_RELU) {
    return M::where(M::gt(x, T(0)), x, x * p0);
  } else if constexpr (A == Activation::GELU) {
    T z = x * T(kSqrt1_2D);
    return T(0.5) * x * (T(1) + M::erf_with_gauss(z, math::gauss<M>(z)));
  } else if constexpr (A == Activation::GELU_TANH) {
    return T(0.5) * x * (T(1) + M::tanh(T(kSqrt2OverPiD) * (x + T(0.044715) * x * x * x)));
  } else if constexpr (A == Activation::SILU) {
    return x * math::sigmoid<M>(x);
  } else if constexpr (A == Activation::MISH) {
    return x * M::tanh(math::softplus<M>(x));
  } else if constexpr (A == Activation::SOFTPLUS) {
    T bx = x * p0;
    return M::where(M::gt(bx, p1), x, M::log1p(M::exp(bx)) / p0);
  } else if constexpr (A == Activation::ELU) {
    // The ELUs take x itself at +-0.0, not alpha * expm1(+-0.0): torch's signed zero whatever alpha
    // is (negative or NaN too) and whether or not M's expm1 keeps the sign of zero (expm1_inline
    // does not, and keeping it would cost instructions that this select does not).
    return M::where(M::lt(x, T(0)), p0 * M::expm1(x), x);
  } else if constexpr (A == Activation::SELU) {
    return T(kSeluScaleD) * M::where(M::lt(x, T(0)), T(kSeluAlphaD) * M::expm1(x), x);
  } else if constexpr (A == Activation::CELU) {
    return M::where(M::lt(x, T(0)), p0 * M::expm1(x / p0), x);
  } else if constexpr (A == Activation::SIGMOID) {
    return math::sigmoid<M>(x);
  } else if constexpr (A == Activation::TANH) {
    return M::tanh(x);
  } else if constexpr (A == Activation::HARDSWISH) {
    // Products by 1/6 and 1/3 where torch divides: within an ulp of it, and a division per vector
    // costs more than the rest of Hardswish.
    return x * M::clamp(x + T(3), T(0), T(6)) * T(1.0 / 6.0);
  } else {
    static_assert(A == Activation::HARDSIGMOID, "unknown activation");
    return M::clamp(x + T(3), T(0), T(6)) * T(1.0 / 6.0);
  }
}

// f'(x). At x = +-inf it is the finite limit; at NaN it is NaN. The smooth gates clamp x (xc) only
// where an infinite x would meet a zero factor (inf * 0): f' has reached its limit long before the
// clamp, and the saturating parts (erf, tanh, sigmoid of x) are the very expressions of f(x), which
// the compiler then computes once when a kernel wants both.
template <Activation A, typename M, typename T>
MK_HOST_DEVICE T activation_derivative_of(T x, T p0, T p1) {
  T d;
  if constexpr (A == Activation::RELU) {
    d = M::where(M::gt(x, T(0)), T(1), T(0));
  } else if constexpr (A == Activation::LEAKY_RELU) {
    d = M::where(M::gt(x, T(0)), T(1), p0);
  } else if constexpr (A == Activation::GELU) {
    T xc = M::clamp(x, T(-40), T(40));
    T z = x * T(kSqrt1_2D);
    T g = math::gauss<M>(z);  // exp(-x * x / 2)
    T cdf = T(0.5) * (T(1) + M::erf_with_gauss(z, g));
    T pdf = g * T(kInvSqrt2PiD);
    d = cdf + xc * pdf;
  } else if constexpr (A == Activation::GELU_TANH) {
    T xc = M::clamp(x, T(-40), T(40));
    T t = M::tanh(T(kSqrt2OverPiD) * (x + T(0.044715) * x * x * x));
    d = T(0.5) * (T(1) + t) +
        T(0.5) * xc * (T(1) - t * t) * T(kSqrt2OverPiD) * (T(1) + T(3.0 * 0.044715) * xc * xc);
  } else if constexpr (A == Activation::SILU) {
    T xc = M::clamp(x, T(-100), T(100));
    T s = math::sigmoid<M>(x);
    d = s * (T(1) + xc * (T(1) - s));
  } else if constexpr (A == Activation::MISH) {
    T xc = M::clamp(x, T(-100), T(100));
    T t = M::tanh(math::softplus<M>(x));
    d = t + xc * math::sigmoid<M>(x) * (T(1) - t * t);
  } else if constexpr (A == Activation::SOFTPLUS) {
    T bx = x * p0;
    d = M::where(M::gt(bx, p1), T(1), math::sigmoid<M>(bx));
  } else if constexpr (A == Activation::ELU) {
    d = M::where(M::gt(x, T(0)), T(1), p0 * M::exp(x));
  } else if constexpr (A == Activation::SELU) {
    d = T(kSeluScaleD) * M::where(M::gt(x, T(0)), T(1), T(kSeluAlphaD) * M::exp(x));
  } else if constexpr (A == Activation::CELU) {
    d = M::where(M::gt(x, T(0)), T(1), M::exp(x / p0));
  } else if constexpr (A == Activation::SIGMOID) {
    T s = math::sigmoid<M>(x);
    d = s * (T(1) - s);
  } else if constexpr (A == Activation::TANH) {
    T t = M::tanh(x);
    d = T(1) - t * t;
  } else if constexpr (A == Activation::HARDSWISH) {
    d = M::where(M::le(x, T(-3)), T(0), M::where(M::lt(x, T(3)), x * T(1.0 / 3.0) + T(0.5), T(1)));
  } else {
    static_assert(A == Activation::HARDSIGMOID, "unknown activation");
    d = M::where(M::gt(x, T(-3)), M::where(M::lt(x, T(3)), T(1.0 / 6.0), T(0)), T(0));
  }
  return M::where(M::isnan(x), x, d);
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime id `act` (checked by the caller),
// so kernels are compiled once per activation with no per-element switch.
template <typename F>
MK_HOST_DEVICE decltype(auto) dispatch_activation(Activation act, F&& f) {
#define MK_ACTIVATION_CASE(NAME) \
  case Activation::NAME:         \
    return f(std::integral_constant<Activation, Activation::NAME>{});
  switch (act) {
    MK_ACTIVATION_CASE(RELU)
    MK_ACTIVATION_CASE(LEAKY_RELU)
    MK_ACTIVATION_CASE(GELU)
    MK_ACTIVATION_CASE(GELU_TANH)
    MK_ACTIVATION_CASE(SILU)
    MK_ACTIVATION_CASE(MISH)
    MK_ACTIVATION_CASE(SOFTPLUS)
    MK_ACTIVATION_CASE(ELU)
    MK_ACTIVATION_CASE(SELU)
    MK_ACTIVATION_CASE(CELU)
    MK_ACTIVATION_CASE(SIGMOID)
    MK_ACTIVATION_CASE(TANH)
    MK_ACTIVATION_CASE(HARDSWISH)
    default:
      return f(std::integral_constant<Activation, Activation::HARDSIGMOID>{});
  }
#undef MK_ACTIVATION_CASE
}

// Scalar f(x) and f'(x) for a runtime activation id, in T = float or double.
template <typename T>
MK_HOST_DEVICE T activation_value(Activation act, T x, T p0, T p1) {
  return dispatch_activation(act, [&](auto a) { return activation_value_of<decltype(a)::value, ScalarMath<T>>(x, p0, p1); });
}
template <typename T>
MK_HOST_DEVICE T activation_derivative(Activation act, T x, T p0, T p1) {
  return dispatch_activation(act, [&](auto a) { return activation_derivative_of<decltype(a)::value, ScalarMath<T>>(x, p0, p1); });
}

}  // namespace memkernels
