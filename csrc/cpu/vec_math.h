// CPU building blocks shared by the kernels in csrc/cpu: the activation math of activations.h on
// ATen's Vectorized types, and the loads and stores that let one kernel body serve every dtype.
//
// A kernel walks its tensors in tiles of kTile elements, in parallel over tiles, and each tile a
// vector at a time in its compute dtype (float for float32/bfloat16/float16, double for float64):
// load_vec and store_vec convert bfloat16 and float16 in registers.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "activations.h"
#include "cpu/pages.h"

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

// The policies `M` of activations.h on ATen's vectors: what the float and double ones share.
template <typename V>
struct VecMathBase {
  static constexpr bool kFloat = std::is_same_v<V, Vectorized<float>>;
#if defined(CPU_CAPABILITY_AVX512)
  // Comparisons give mask registers and where() blends on them: ATen's comparisons give vectors of
  // all-ones lanes, which each blend turns back into a mask register, two instructions per where
  // that cost a cheap activation in bfloat16 a quarter of its time.
  using Mask = std::conditional_t<kFloat, __mmask16, __mmask8>;
  template <int kPredicate>
  static Mask compare(const V& a, const V& b) {
    if constexpr (kFloat) {
      return _mm512_cmp_ps_mask(a, b, kPredicate);
    } else {
      return _mm512_cmp_pd_mask(a, b, kPredicate);
    }
  }
  static V where(Mask mask, const V& a, const V& b) {
    if constexpr (kFloat) {
      return _mm512_mask_blend_ps(mask, b, a);
    } else {
      return _mm512_mask_blend_pd(mask, b, a);
    }
  }
#else
  using Mask = V;  // all-ones lanes where true, as ATen's comparisons give them
  template <int kPredicate>
  static Mask compare(const V& a, const V& b) {
    if constexpr (kFloat) {
      return _mm256_cmp_ps(a, b, kPredicate);
    } else {
      return _mm256_cmp_pd(a, b, kPredicate);
    }
  }
  static V where(const Mask& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
#endif
  // Ordered: false where either side is NaN.
  static Mask lt(const V& a, const V& b) { return compare<_CMP_LT_OQ>(a, b); }
  static Mask le(const V& a, const V& b) { return compare<_CMP_LE_OQ>(a, b); }
  static Mask gt(const V& a, const V& b) { return compare<_CMP_GT_OQ>(a, b); }
  static Mask eq(const V& a, const V& b) { return compare<_CMP_EQ_OQ>(a, b); }
  static Mask isnan(const V& x) { return compare<_CMP_UNORD_Q>(x, x); }
  // min(hi, max(lo, x)) with x the second operand of both: x86 returns it when it is NaN.
  static V clamp(const V& x, const V& lo, const V& hi) { return at::vec::clamp(x, lo, hi); }
};
using FloatMasks = VecMathBase<Vectorized<float>>;

// exp, expm1, tanh and log1p for float lanes, inlined: Sleef's calls are as accurate, but a call
// spills every vector register (all caller-saved), and in a kernel that keeps its constants in
// registers that cost more than the function itself.
//
// Cephes' expf reduction: x = n ln2 + r, |r| <= ln2 / 2, and e^r - 1 = r + r^2 P(r) (degree 5).
// x is clamped to [-104, 89] first, past which exp is 0 or inf anyway, so n stays integral and
// finite; NaN passes the clamp and stays NaN.
struct ExpReduction {
  Vectorized<float> n;      // integral
  Vectorized<float> em1_r;  // e^r - 1
};
inline ExpReduction reduce_exp(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using at::vec::fmadd;
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
  return {n, fmadd(p, r * r, r)};
}
// v * 2^n for integral n in [-150, 129], rounded once: denormal or inf where it must be.
inline Vectorized<float> scale_by_pow2(const Vectorized<float>& v, const Vectorized<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(v, n);
#else
  // 2^n as two factors 2^(n/2) and 2^(n - n/2), each a normal float.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const Vectorized<float> s1(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23)));
  const Vectorized<float> s2(
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23)));
  return v * s1 * s2;
#endif
}
// exp(x) within 2 ulp over all of float (tests/test_cpu_kernels.py), denormal results included.
inline Vectorized<float> exp_inline(const Vectorized<float>& x) {
  const ExpReduction e = reduce_exp(x);
  return scale_by_pow2(e.em1_r + Vectorized<float>(1.0f), e.n);
}
// expm1(x) = 2^n (e^r - 1) + (2^n - 1): exactly the polynomial where n = 0 (|x| < ln2 / 2), so no
// cancellation near 0; -1 below x = -104.
inline Vectorized<float> expm1_inline(const Vectorized<float>& x) {
  const ExpReduction e = reduce_exp(x);
  const Vectorized<float> scale = scale_by_pow2(Vectorized<float>(1.0f), e.n);
  return at::vec::fmadd(scale, e.em1_r, scale - Vectorized<float>(1.0f));
}
// tanh(|x|) = e / (e + 2) = 1 - 2 / (e + 2) with e = expm1(2|x|): the first form near 0, where it
// keeps expm1's relative accuracy, the second from |x| = 0.5 on, where it keeps the distance to 1
// accurate (what 1 + tanh and 1 - tanh^2 in GELU's tanh form and Mish cancel down to). Float tanh
// is 1 past |x| = 9.1, so |x| is clamped to 10, short of expm1's overflow; the sign of x is put back.
inline Vectorized<float> tanh_inline(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V ax = at::vec::clamp(x.abs(), V(0.0f), V(10.0f));
  const V e = expm1_inline(ax * V(2.0f));
  const V r = V(1.0f) / (e + V(2.0f));
  const V t = FloatMasks::where(FloatMasks::lt(ax, V(0.5f)), e * r, at::vec::fmadd(V(-2.0f), r, V(1.0f)));
  return t | (x & V(-0.0f));
}

// log1p(x) = log(u) + (x - (u - 1)) / u with u = 1 + x rounded (the correction restores what the
// rounding of u lost), log(u) by Cephes' logf: u = m 2^e with m in [sqrt(1/2), sqrt(2)) (musl's
// integer split), log(m) = f - f^2 / 2 + f^3 P(f), f = m - 1. -1 gives -inf, below -1 NaN.
inline Vectorized<float> log1p_inline(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using at::vec::fmadd;
  const V u = x + V(1.0f);
  constexpr int kSqrtHalfBits = 0x3f3504f3;  // sqrt(1/2) as float bits
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i shifted = _mm512_sub_epi32(_mm512_castps_si512(u), _mm512_set1_epi32(kSqrtHalfBits));
  const V e(_mm512_cvtepi32_ps(_mm512_srai_epi32(shifted, 23)));
  const V m(_mm512_castsi512_ps(_mm512_add_epi32(_mm512_and_si512(shifted, _mm512_set1_epi32(0x7fffff)),
                                                 _mm512_set1_epi32(kSqrtHalfBits))));
#else
  const __m256i shifted = _mm256_sub_epi32(_mm256_castps_si256(u), _mm256_set1_epi32(kSqrtHalfBits));
  const V e(_mm256_cvtepi32_ps(_mm256_srai_epi32(shifted, 23)));
  const V m(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(shifted, _mm256_set1_epi32(0x7fffff)),
                                                 _mm256_set1_epi32(kSqrtHalfBits))));
#endif
  const V f = m - V(1.0f);
  const V z = f * f;
  V p = fmadd(V(7.0376836292e-2f), f, V(-1.1514610310e-1f));
  p = fmadd(p, f, V(1.1676998740e-1f));
  p = fmadd(p, f, V(-1.2420140846e-1f));
  p = fmadd(p, f, V(1.4249322787e-1f));
  p = fmadd(p, f, V(-1.6668057665e-1f));
  p = fmadd(p, f, V(2.0000714765e-1f));
  p = fmadd(p, f, V(-2.4999993993e-1f));
  p = fmadd(p, f, V(3.3333331174e-1f));
  V y = fmadd(p * f, z, e * V(-2.12194440e-4f));
  y = fmadd(z, V(-0.5f), y);
  V log_u = fmadd(e, V(0.693359375f), f + y);
  log_u = log_u + (x - (u - V(1.0f))) / u;
  const V inf(std::numeric_limits<float>::infinity());
  using FM = FloatMasks;
  log_u = FM::where(FM::eq(u, inf), inf, log_u);
  log_u = FM::where(FM::eq(u, V(0.0f)), V(0.0f) - inf, log_u);
  // u < 0 or NaN: not u >= 0.
  return FM::where(FM::compare<_CMP_NGE_UQ>(u, V(0.0f)), V(std::numeric_limits<float>::quiet_NaN()), log_u);
}

// float32, bfloat16 and float16 tensors: the inlined functions above.
struct FloatVecMath : VecMathBase<Vectorized<float>> {
  using V = Vectorized<float>;
  static V exp(const V& x) { return exp_inline(x); }
  static V expm1(const V& x) { return expm1_inline(x); }
  static V log1p(const V& x) { return log1p_inline(x); }
  static V tanh(const V& x) { return tanh_inline(x); }
  // ATen's own erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7, the erf of torch.erf on CPU) with
  // its exp(-z * z) passed in, so GELU's f and f' share one exp.
  static V erf_with_gauss(const V& z, const V& gauss) {
    using at::vec::fmadd;
    const V sign = z & V(-0.0f);
    const V t = V(1.0f) / fmadd(V(0.3275911f), z.abs(), V(1.0f));
    V r = fmadd(V(1.061405429f), t, V(-1.453152027f));
    r = fmadd(r, t, V(1.421413741f));
    r = fmadd(r, t, V(-0.284496736f));
    r = fmadd(r, t, V(0.254829592f));
    return sign ^ fmadd(V(0.0f) - gauss * t, r, V(1.0f));
  }
};

// float64 tensors, which gradcheck holds to double precision: ATen's (Sleef's) functions.
struct DoubleVecMath : VecMathBase<Vectorized<double>> {
  using V = Vectorized<double>;
  static V exp(const V& x) { return x.exp(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V tanh(const V& x) { return x.tanh(); }
  static V erf_with_gauss(const V& z, const V& /*gauss*/) { return z.erf(); }
};

// The policy `M` of activations.h for tensors of scalar_t, computed in opmath_t<scalar_t>.
template <typename scalar_t>
using MathFor = std::conditional_t<std::is_same_v<scalar_t, double>, DoubleVecMath, FloatVecMath>;

// An output that a kernel writes whole: its first byte and its bits an element.
struct Output {
  template <typename scalar_t>
  Output(scalar_t* values) : data(values), bits_per_element(8 * sizeof(scalar_t)) {}
  Output(uint8_t* codes, int64_t bits) : data(codes), bits_per_element(bits) {}  // packed codes
  void* data;
  int64_t bits_per_element;
};

// populate_fresh_pages for the elements [first, last) of each output. Not inlined: inlined into a
// kernel's task it changed GCC's code for the kernel's loop (spills into the stack; a coded SiLU
// forward took 2.2 ms instead of 0.85 at 4M float32 elements).
[[gnu::noinline]] inline void populate_task_outputs(std::initializer_list<Output> outputs, int64_t first,
                                                    int64_t last) {
  for (const Output& output : outputs) {
    if (output.data != nullptr) {
      populate_fresh_pages(static_cast<char*>(output.data) + first * output.bits_per_element / 8,
                           (last - first) * output.bits_per_element / 8);
    }
  }
}

// Runs fn(begin, n) on the tiles [begin, begin + n) covering [0, numel), in parallel; each task
// first populates the pages of `outputs` it will write (populate_fresh_pages).
template <typename F>
void for_each_tile(int64_t numel, std::initializer_list<Output> outputs, const F& fn) {
  const int64_t num_tiles = (numel + kTile - 1) / kTile;
  at::parallel_for(0, num_tiles, kGrainTiles, [&](int64_t tile_begin, int64_t tile_end) {
    populate_task_outputs(outputs, tile_begin * kTile, std::min(tile_end * kTile, numel));
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t begin = tile * kTile;
      fn(begin, std::min(kTile, numel - begin));
    }
    _mm_sfence();  // streamed stores (stream_stores) are weakly ordered: done before the task ends
  });
}

// Whether a kernel writes an output of numel elements at p with non-temporal (streaming) stores. An
// ordinary store first reads its cache line from memory (to own it): for an output too large to
// stay in the last-level cache until it is read again, that read is wasted, and streaming the
// line out saves a third of the output's memory traffic. Outputs from 8 MB up stream, a quarter
// of a server's last-level cache slice (32 MB a core complex on AMD EPYC; sysconf reports the
// whole socket's there, so it is not asked); smaller ones stay cached for their next reader.
// Streams need aligned vectors: p aligned to 64 bytes makes every full vector of a tile aligned.
constexpr int64_t kStreamBytes = int64_t{8} << 20;
template <typename scalar_t>
bool stream_stores(const scalar_t* p, int64_t numel) {
  return numel * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes && reinterpret_cast<uintptr_t>(p) % 64 == 0;
}

// The 16-bit lanes of a float vector's worth of bfloat16 or float16 elements: load_half_lanes
// reads `count` of them (the rest zero), store_half_lanes writes `count` (streamed if all, with
// stream).
#if defined(CPU_CAPABILITY_AVX512)
using HalfLanes = __m256i;
using FloatLanes = __m512;  // the float vector they convert to
inline HalfLanes load_half_lanes(const void* p, int64_t count) {
  return count >= 16 ? _mm256_loadu_si256(static_cast<const __m256i*>(p))
                     : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), p);
}
inline void store_half_lanes(HalfLanes lanes, void* p, int64_t count, bool stream) {
  if (count >= 16 && stream) {
    _mm256_stream_si256(static_cast<__m256i*>(p), lanes);
  } else if (count >= 16) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), lanes);
  } else {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << count) - 1), lanes);
  }
}
#else
using HalfLanes = __m128i;
using FloatLanes = __m256;
inline HalfLanes load_half_lanes(const void* p, int64_t count) {
  if (count >= 8) {
    return _mm_loadu_si128(static_cast<const __m128i*>(p));
  }
  alignas(16) uint16_t lanes[8] = {};
  std::memcpy(lanes, p, count * sizeof(uint16_t));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(lanes));
}
inline void store_half_lanes(HalfLanes lanes, void* p, int64_t count, bool stream) {
  if (count >= 8 && stream) {
    _mm_stream_si128(static_cast<__m128i*>(p), lanes);
  } else if (count >= 8) {
    _mm_storeu_si128(static_cast<__m128i*>(p), lanes);
  } else {
    alignas(16) uint16_t out[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(out), lanes);
    std::memcpy(p, out, count * sizeof(uint16_t));
  }
}
#endif

// A full vector to p (aligned to the vector's size) with a non-temporal store.
inline void stream_vec(const Vectorized<float>& v, float* p) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#else
  _mm256_stream_ps(p, v);
#endif
}
inline void stream_vec(const Vectorized<double>& v, double* p) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_pd(p, v);
#else
  _mm256_stream_pd(p, v);
#endif
}

// bfloat16 and float16: computed in float, converted on load and store.
template <typename scalar_t>
constexpr bool kConvertsToFloat = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;

// Float lanes rounded to bfloat16, to nearest even, NaN kept (as c10's casts and ATen's
// cvtfp32_bf16, in fewer instructions on AVX512: a bit test and a masked add for the rounding, one
// word permute for the narrowing).
inline HalfLanes float_to_bf16(const Vectorized<float>& v) {
#if defined(MEMKERNELS_AVX512_BF16)
  // One instruction rounds to nearest even as c10 does, but it flushes subnormals to zero and
  // keeps a NaN's sign and payload (c10 makes every NaN 0x7fc0): vectors holding either, rare,
  // are rounded by c10 lane by lane, which ties up no vector registers in the loops around.
  constexpr int kNaNOrSubnormal = 0x01 | 0x80 | 0x20;  // vfpclassps: quiet NaN, signalling NaN, denormal
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, kNaNOrSubnormal) == 0, 1)) {
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  }
  alignas(64) float lanes[16];
  alignas(32) uint16_t rounded[16];
  _mm512_store_ps(lanes, v);
  for (int i = 0; i < 16; ++i) {
    rounded[i] = c10::BFloat16(lanes[i]).x;
  }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(rounded));
#elif defined(CPU_CAPABILITY_AVX512)
  const __m512i bits = _mm512_castps_si512(v);
  // + 0x7fff, + 1 more where the lowest kept bit (bit 16) is set: ties go to even.
  const __mmask16 odd = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x10000));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff));
  rounded = _mm512_mask_add_epi32(rounded, odd, rounded, _mm512_set1_epi32(1));
  rounded = _mm512_mask_mov_epi32(rounded, FloatMasks::isnan(v), _mm512_set1_epi32(0x7fc00000));
  const __m512i high_words = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 31, 29, 27, 25, 23,
                                               21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi16(high_words, rounded));
#else
  return at::vec::cvtfp32_bf16(v);
#endif
}

// A vector of the compute type T from `count` elements of scalar_t at p (lanes past count zero),
// and back. bfloat16 and float16 convert in registers, a float vector's worth at a time: through a
// buffer, a conversion costs a store and a load each way, as much as a cheap activation itself.
template <typename T, typename scalar_t>
__attribute__((always_inline)) inline Vectorized<T> load_vec(const scalar_t* p, int64_t count) {
  using V = Vectorized<T>;
  if constexpr (std::is_same_v<T, scalar_t>) {
    return count >= V::size() ? V::loadu(p) : V::loadu(p, count);
  } else {
    static_assert(std::is_same_v<T, float> && sizeof(scalar_t) == 2, "16-bit floats convert to float");
    const HalfLanes lanes = load_half_lanes(p, count);
    FloatLanes out;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      at::vec::cvtbf16_fp32(lanes, out);
    } else {
      at::vec::cvtfp16_fp32(lanes, out);
    }
    return out;
  }
}
// stream: non-temporal stores for full vectors (see stream_stores). Always inlined, as every
// function of the loops: a call would spill the kernel's vector registers.
template <typename T, typename scalar_t>
__attribute__((always_inline)) inline void store_vec(const Vectorized<T>& v, scalar_t* p, int64_t count,
                                                     bool stream) {
  if constexpr (std::is_same_v<T, scalar_t>) {
    if (count >= Vectorized<T>::size() && stream) {
      stream_vec(v, p);
    } else if (count >= Vectorized<T>::size()) {
      v.store(p);
    } else {
      v.store(p, count);
    }
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    // Round to nearest even, NaN kept: as at::vec::convert_from_float and c10's scalar casts.
    store_half_lanes(float_to_bf16(v), p, count, stream);
  } else {
    store_half_lanes(at::vec::cvtfp32_fp16(v), p, count, stream);
  }
}

// Applies fn(i, count) to the vectors of a tile of n elements: i steps by the vector width.
// Always inlined: as a call per tile, the loop reloads every pointer the kernel's lambdas captured
// by reference on each vector, and cannot keep the kernel's constants in registers. The full
// vectors take a loop of their own, where count is the constant width and every branch on it
// (partial loads and stores, a code tail) folds away; then the last, partial vector. fn is so
// called from two places, and GCC would then make a kernel's lambda (and the lambdas it calls) a
// function of its own: they are declared __attribute__((always_inline)).
template <typename T, typename F>
__attribute__((always_inline)) inline void for_each_vec(int64_t n, const F& fn) {
  constexpr int64_t width = Vectorized<T>::size();
  int64_t i = 0;
  for (; i + width <= n; i += width) {
    fn(i, width);
  }
  if (i < n) {
    fn(i, n - i);
  }
}

// What activation A's code compares with its borders: x, or -|x| (kCodesNegatedMagnitude).
// V: a Vectorized or a scalar.
template <Activation A, typename V>
inline V code_input_of(const V& x) {
  if constexpr (!kCodesNegatedMagnitude<A>) {
    return x;
  } else if constexpr (std::is_floating_point_v<V>) {
    return -std::abs(x);
  } else {
    return x.abs().neg();
  }
}

// code_input_of<A> of the n float or double elements at src, as float, for comparing with float32
// borders: src itself where nothing changes it, else written into buf (kTile long). (bfloat16
// and float16 kernels convert to float anyway and keep their float vectors instead.) float64 is
// rounded up, not to nearest: for every float b, b < x exactly when b < (x rounded up), so each
// comparison is the one float64 x would make (a positive 1e-50 is above ReLU's border 0, where
// rounding to nearest would make it 0).
template <Activation A, typename scalar_t>
const float* code_input_tile(const scalar_t* src, int64_t n, float* buf) {
  static_assert(std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if constexpr (!kCodesNegatedMagnitude<A>) {
      return src;
    }
    for_each_vec<float>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) {
      code_input_of<A>(load_vec<float>(src + i, count)).store(buf + i, count);
    });
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const double x = code_input_of<A>(src[i]);
      const float rounded = static_cast<float>(x);
      buf[i] = static_cast<double>(rounded) < x ? std::nextafter(rounded, std::numeric_limits<float>::infinity())
                                                : rounded;
    }
    return buf;
  }
}

}  // namespace memkernels::cpu::CPU_CAPABILITY
