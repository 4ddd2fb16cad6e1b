// CPU building blocks shared by the kernels in csrc/cpu: the activation math of activations.h on
// ATen's Vectorized types, and tiles that let one kernel body serve every dtype.
//
// A kernel walks its tensors in tiles of kTile elements, in parallel over tiles. Each tile is seen
// in its compute dtype (float for float32/bfloat16/float16, double for float64): float32 and
// float64 tensors are read and written in place, bfloat16 and float16 go through a float buffer
// on the stack, converted a vector at a time.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "activations.h"

// In a namespace named by the instruction set (as ATen's Vectorized): the kernels are compiled once
// per set (activation_kernels.h), and each copy must keep its own.
namespace memkernels::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per tile. A multiple of 8, so the packed groups of 8 codes never straddle two tiles
// (and two threads never write the same byte), and of every vector width.
constexpr int64_t kTile = 256;
// Tiles per parallel task: about 16K elements, enough to amortise a task's start.
constexpr int64_t kGrainTiles = 64;

// float64 computes in double, every other floating dtype in float (as memkernels/reference.py).
template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// exp(x) for float lanes, inlined (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
// polynomial for e^r, then scaled by 2^n), within 2 ulp of exp on all of float. Sleef's call is as
// accurate, but a call spills every vector register (all caller-saved): in a kernel that keeps its
// constants in registers, that cost more than the exp itself. exp(-inf) = 0, exp(+inf) = +inf,
// results below FLT_MIN are denormal (as std::exp), NaN stays NaN.
inline Vectorized<float> exp_inline(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using at::vec::fmadd;
  // Past these bounds exp is 0 or inf whatever the clamp; the clamp keeps n integral and finite.
  const V xc = at::vec::clamp(x, V(-104.0f), V(89.0f));
  const V n = (xc * V(1.44269504088896341f)).round();
  // r = x - n ln2, ln2 split in two so that n * 0.693359375 is exact.
  V r = fmadd(n, V(-0.693359375f), xc);
  r = fmadd(n, V(2.12194440e-4f), r);
  V p = fmadd(V(1.9875691500e-4f), r, V(1.3981999507e-3f));
  p = fmadd(p, r, V(8.3334519073e-3f));
  p = fmadd(p, r, V(4.1665795894e-2f));
  p = fmadd(p, r, V(1.6666665459e-1f));
  p = fmadd(p, r, V(5.0000001201e-1f));
  p = fmadd(p, r * r, r + V(1.0f));  // e^r
#if defined(CPU_CAPABILITY_AVX512)
  return V(_mm512_scalef_ps(p, n));  // p * 2^n, rounded once, denormal or inf where it must be
#else
  // 2^n as two factors 2^(n/2) and 2^(n - n/2), each a normal float for n in [-150, 129].
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const V s1(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23)));
  const V s2(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23)));
  return p * s1 * s2;
#endif
}

// The policy `M` of activations.h for V = Vectorized<float> or Vectorized<double>.
template <typename V>
struct VecMath {
  static V exp(const V& x) {
    if constexpr (std::is_same_v<V, Vectorized<float>>) {
      return exp_inline(x);
    } else {
      return x.exp();
    }
  }
  static V expm1(const V& x) { return x.expm1(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V erf(const V& x) { return x.erf(); }
  // float: ATen's own erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7, the erf of torch.erf on
  // CPU) with its exp(-z * z) passed in, so GELU's f and f' share one exp. double: exact erf.
  static V erf_with_gauss(const V& z, const V& gauss) {
    if constexpr (std::is_same_v<V, Vectorized<float>>) {
      using at::vec::fmadd;
      const V sign = z & V(-0.0f);
      const V t = V(1.0f) / fmadd(V(0.3275911f), z.abs(), V(1.0f));
      V r = fmadd(V(1.061405429f), t, V(-1.453152027f));
      r = fmadd(r, t, V(1.421413741f));
      r = fmadd(r, t, V(-0.284496736f));
      r = fmadd(r, t, V(0.254829592f));
      return sign ^ fmadd(V(0.0f) - gauss * t, r, V(1.0f));
    } else {
      return z.erf();
    }
  }
  static V tanh(const V& x) { return x.tanh(); }
  static V isnan(const V& x) { return x.isnan(); }
  static V where(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
};

// The policy `M` of activations.h for tensors of scalar_t, computed in opmath_t<scalar_t>.
template <typename scalar_t>
using MathFor = VecMath<Vectorized<opmath_t<scalar_t>>>;

// Runs fn(begin, n) on the tiles [begin, begin + n) covering [0, numel), in parallel.
template <typename F>
void for_each_tile(int64_t numel, const F& fn) {
  const int64_t num_tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, num_tiles, kGrainTiles, [&](int64_t tile_begin, int64_t tile_end) {
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t begin = tile * kTile;
      fn(begin, std::min(kTile, numel - begin));
    }
  });
}

// One vector from p, or its first `count` lanes (the rest zero) at the end of a tile.
template <typename T>
Vectorized<T> load_vec(const T* p, int64_t count) {
  return count >= Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, count);
}
template <typename T>
void store_vec(const Vectorized<T>& v, T* p, int64_t count) {
  if (count >= Vectorized<T>::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

// Applies fn(i, count) to the vectors of a tile of n elements: i steps by the vector width.
// Always inlined: as a call per tile, the loop reloads every pointer the kernel's lambdas captured
// by reference on each vector, and cannot keep the kernel's constants in registers.
template <typename T, typename F>
__attribute__((always_inline)) inline void for_each_vec(int64_t n, const F& fn) {
  constexpr int64_t width = Vectorized<T>::size();
  for (int64_t i = 0; i < n; i += width) {
    fn(i, std::min(width, n - i));
  }
}

// The n elements at src in the compute dtype T: src itself, or converted into buf (kTile long).
template <typename T, typename scalar_t>
const T* read_tile(const scalar_t* src, int64_t n, T* buf) {
  if constexpr (std::is_same_v<T, scalar_t>) {
    return src;
  } else {
    constexpr int64_t width = Vectorized<scalar_t>::size();
    static_assert(width == 2 * Vectorized<T>::size(), "a reduced-precision vector holds two float vectors");
    for (int64_t i = 0; i < n; i += width) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(load_vec(src + i, std::min(width, n - i)));
      lo.store(buf + i);
      hi.store(buf + i + width / 2);
    }
    return buf;
  }
}

// Where a kernel writes a tile of dst in the compute dtype: dst itself, or buf (then write_tile).
template <typename T, typename scalar_t>
T* tile_output(scalar_t* dst, T* buf) {
  if constexpr (std::is_same_v<T, scalar_t>) {
    return dst;
  } else {
    return buf;
  }
}
template <typename T, typename scalar_t>
void write_tile(const T* computed, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, scalar_t>) {
    constexpr int64_t width = Vectorized<scalar_t>::size();
    for (int64_t i = 0; i < n; i += width) {
      auto v = at::vec::convert_from_float<scalar_t>(
          Vectorized<T>::loadu(computed + i), Vectorized<T>::loadu(computed + i + width / 2));
      store_vec(v, dst + i, std::min(width, n - i));
    }
  }
}

// The n elements at src as float, for codes (borders are float32: the reference compares x cast
// to float32): src itself for float, else converted into buf.
template <typename T>
const float* float_tile(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = static_cast<float>(src[i]);
    }
    return buf;
  }
}

}  // namespace memkernels::cpu::CPU_CAPABILITY
