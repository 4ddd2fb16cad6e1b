// Philox4x32-10 of csrc/philox.h for 8 counters at a time with AVX2: the random words of the CPU
// kernels that draw many (feedback_project's B, quantize_groups' rounding noise).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "philox.h"

namespace memkernels::cpu {

constexpr int64_t kPhiloxLanes = 8;  // counters one call of philox_lanes runs

#if defined(__AVX2__)
// (high, low) 32-bit halves of a * x in each of 8 lanes: _mm256_mul_epu32 multiplies the even lanes
// into 64 bits, so the odd lanes go through it shifted down.
inline void mul_hi_lo(__m256i x, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, a);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(x, a);
}
#endif

// words[w][j] = word w of philox4x32_10 at counter (offset + j, c2, c3) under key (k0, k1), where
// offset + j fills the counter's low 64 bits (c0, c1), for j < kPhiloxLanes.
inline void philox_lanes(uint64_t offset, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                         uint32_t words[4][kPhiloxLanes]) {
#if defined(__AVX2__)
  alignas(32) uint32_t lo[kPhiloxLanes], hi[kPhiloxLanes];
  for (int64_t j = 0; j < kPhiloxLanes; ++j) {
    lo[j] = static_cast<uint32_t>(offset + j);
    hi[j] = static_cast<uint32_t>((offset + j) >> 32);
  }
  __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i x2 = _mm256_set1_epi32(static_cast<int>(c2)), x3 = _mm256_set1_epi32(static_cast<int>(c3));
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i hi_b, lo_b, hi_a, lo_a;
    mul_hi_lo(x2, round_b, hi_b, lo_b);
    mul_hi_lo(x0, round_a, hi_a, lo_a);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1), _mm256_set1_epi32(static_cast<int>(k0)));
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3), _mm256_set1_epi32(static_cast<int>(k1)));
    x1 = lo_b;
    x3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0]), x0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1]), x1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2]), x2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3]), x3);
#else
  for (int64_t j = 0; j < kPhiloxLanes; ++j) {
    const uint64_t counter = offset + j;
    const PhiloxWords p = philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), c2,
                                        c3, k0, k1);
    for (int w = 0; w < 4; ++w) {
      words[w][j] = p.w[w];
    }
  }
#endif
}

}  // namespace memkernels::cpu
