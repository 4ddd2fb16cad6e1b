// Activation ids and scalar math shared by the CPU and CUDA kernels.
// The ids match memkernels/activations/spec.py (Activation); the math matches
// memkernels/reference.py (activation_value / activation_derivative), in float.
#pragma once
#include <cmath>
#include <cstdint>

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

constexpr float kSeluAlpha = 1.6732632423543772848170429916717f;
constexpr float kSeluScale = 1.0507009873554804934193349852946f;
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;

// Bits of the packed codes: groups of 8 elements take `bits` bytes (see reference.py).
MK_HOST_DEVICE bool valid_bits(int64_t bits) {
  return bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8;
}
MK_HOST_DEVICE int64_t packed_nbytes(int64_t numel, int64_t bits) { return (numel + 7) / 8 * bits; }

}  // namespace memkernels
