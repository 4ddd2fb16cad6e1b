// k-bit codes on CPU: the packed layout of memkernels/reference.py and the codes of an activation.
//
// Layout: element i is in group g = i / 8 at slot j = i % 8, bits [j*k, j*k + k) of the
// little-endian integer formed by the k bytes packed[g*k, g*k + k). Kernels pack and unpack whole
// groups; a tile of kTile elements holds kTile / 8 groups.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "activations.h"

// Per instruction set, as vec_math.h.
namespace memkernels::cpu::CPU_CAPABILITY {

// Calls f(std::integral_constant<int64_t, bits>{}) for bits in (1, 2, 3, 4, 8), checked by the caller.
template <typename F>
decltype(auto) dispatch_bits(int64_t bits, const F& f) {
  switch (bits) {
    case 1:
      return f(std::integral_constant<int64_t, 1>{});
    case 2:
      return f(std::integral_constant<int64_t, 2>{});
    case 3:
      return f(std::integral_constant<int64_t, 3>{});
    case 4:
      return f(std::integral_constant<int64_t, 4>{});
    default:
      return f(std::integral_constant<int64_t, 8>{});
  }
}

// Packs the codes of `groups` groups of 8 (codes < 2**kBits) into groups * kBits bytes.
template <int64_t kBits, typename code_t>
inline void pack_groups(const code_t* codes, int64_t groups, uint8_t* out) {
  for (int64_t g = 0; g < groups; ++g, codes += 8, out += kBits) {
    uint64_t word = 0;
    for (int64_t j = 0; j < 8; ++j) {
      word |= static_cast<uint64_t>(codes[j]) << (j * kBits);
    }
    for (int64_t b = 0; b < kBits; ++b) {
      out[b] = static_cast<uint8_t>(word >> (8 * b));
    }
  }
}

// Inverse of pack_groups: 8 * groups codes from groups * kBits bytes.
template <int64_t kBits, typename code_t>
inline void unpack_groups(const uint8_t* in, int64_t groups, code_t* codes) {
  constexpr uint64_t mask = (uint64_t{1} << kBits) - 1;
  for (int64_t g = 0; g < groups; ++g, in += kBits, codes += 8) {
    uint64_t word = 0;
    for (int64_t b = 0; b < kBits; ++b) {
      word |= static_cast<uint64_t>(in[b]) << (8 * b);
    }
    for (int64_t j = 0; j < 8; ++j) {
      codes[j] = static_cast<code_t>((word >> (j * kBits)) & mask);
    }
  }
}

// ---- two groups at a time, for kBits <= 4 ----
// 16 codes go through one 128-bit register as bytes, group g in bytes [8g, 8g + 8); shifts within
// its 64-bit halves gather a group's 8 fields into its low kBits bytes (SWAR) and spread them back.
constexpr int64_t kSwarCodes = 16;

// The bytes of the 16 codes #{j : borders[j] < x[i]} (NaN compares false: 0) of x[0, 16).
template <int64_t kBits>
inline __m128i code_bytes(const float* x, const at::vec::Vectorized<float>* border_vecs) {
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  constexpr int64_t num_borders = (int64_t{1} << kBits) - 1;
  const auto count_above = [&](const V& xv) {
    VI code(0);
    for (int64_t j = 0; j < num_borders; ++j) {
      code = code - at::vec::cast<int32_t>(xv > border_vecs[j]);  // a true lane is -1
    }
    return code;
  };
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_epi8(count_above(V::loadu(x)));
#else
  const __m256i lo = count_above(V::loadu(x)), hi = count_above(V::loadu(x + 8));
  return _mm_packus_epi16(
      _mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)),
      _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
#endif
}

// 1-bit codes of x[0, 16): bit i is borders[0] < x[i] (NaN: 0), so the 16 comparison bits are
// already the two packed groups, with no byte-wise counting.
inline uint64_t sign_words(const float* x, float border) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(x), _mm512_set1_ps(border), _CMP_GT_OQ);
#else
  const __m256 b = _mm256_set1_ps(border);
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), b, _CMP_GT_OQ));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8), b, _CMP_GT_OQ));
  return static_cast<uint64_t>(lo | hi << 8);
#endif
}

// The two groups of code bytes packed: group 0 in bytes [0, kBits), group 1 in [kBits, 2 kBits).
template <int64_t kBits>
inline uint64_t swar_words(__m128i b) {
  b = _mm_and_si128(_mm_or_si128(b, _mm_srli_epi64(b, 8 - kBits)), _mm_set1_epi16((1 << (2 * kBits)) - 1));
  b = _mm_and_si128(_mm_or_si128(b, _mm_srli_epi64(b, 16 - 2 * kBits)), _mm_set1_epi32((1 << (4 * kBits)) - 1));
  b = _mm_or_si128(b, _mm_srli_epi64(b, 32 - 4 * kBits));
  constexpr uint64_t group_mask = (uint64_t{1} << (8 * kBits)) - 1;
  return (static_cast<uint64_t>(_mm_cvtsi128_si64(b)) & group_mask) |
         (static_cast<uint64_t>(_mm_extract_epi64(b, 1)) << (8 * kBits));
}

// The little-endian integer of the kBytes (2, 4, 6 or 8) bytes at p, in loads of whole integers (a
// memcpy into a zeroed word would store and reload it: a store-forwarding stall every group pair).
template <int64_t kBytes>
inline uint64_t load_bytes(const uint8_t* p) {
  if constexpr (kBytes == 6) {
    uint32_t low;
    uint16_t high;
    std::memcpy(&low, p, 4);
    std::memcpy(&high, p + 4, 2);
    return low | static_cast<uint64_t>(high) << 32;
  } else {
    std::conditional_t<kBytes == 2, uint16_t, std::conditional_t<kBytes == 4, uint32_t, uint64_t>> word;
    static_assert(sizeof(word) == kBytes, "2, 4, 6 or 8 bytes");
    std::memcpy(&word, p, kBytes);
    return word;
  }
}

// Inverse of swar_words: the 16 code bytes of two packed groups.
template <int64_t kBits>
inline __m128i unswar_words(uint64_t words) {
  constexpr uint64_t group_mask = (uint64_t{1} << (8 * kBits)) - 1;
  __m128i b = _mm_set_epi64x(static_cast<int64_t>(words >> (8 * kBits)), static_cast<int64_t>(words & group_mask));
  b = _mm_and_si128(_mm_or_si128(b, _mm_slli_epi64(b, 32 - 4 * kBits)), _mm_set1_epi32((1 << (4 * kBits)) - 1));
  b = _mm_and_si128(_mm_or_si128(b, _mm_slli_epi64(b, 16 - 2 * kBits)), _mm_set1_epi16((1 << (2 * kBits)) - 1));
  return _mm_and_si128(_mm_or_si128(b, _mm_slli_epi64(b, 8 - kBits)), _mm_set1_epi8((1 << kBits) - 1));
}

// A table of up to 16 float levels in registers, looked up by permutes rather than gathers.
struct LevelVectors {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 levels;
  explicit LevelVectors(const float* table) : levels(_mm512_loadu_ps(table)) {}
  // out[0, 16) = levels[code byte i].
  void lookup(__m128i code_bytes, float* out) const {
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(code_bytes), levels));
  }
  // out[0, 16) = levels[bit i of bits]: 1-bit codes, two packed groups.
  void lookup_bits(uint64_t bits, float* out) const {
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(
                              _mm512_maskz_set1_epi32(static_cast<__mmask16>(bits), 1), levels));
  }
#else
  __m256 low, high;  // levels [0, 8) and [8, 16)
  explicit LevelVectors(const float* table) : low(_mm256_loadu_ps(table)), high(_mm256_loadu_ps(table + 8)) {}
  void lookup(__m128i code_bytes, float* out) const {
    _mm256_storeu_ps(out, lookup8(_mm256_cvtepu8_epi32(code_bytes)));
    _mm256_storeu_ps(out + 8, lookup8(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(code_bytes, code_bytes))));
  }
  void lookup_bits(uint64_t bits, float* out) const {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int half = 0; half < 2; ++half) {
      const __m256i byte = _mm256_set1_epi32(static_cast<int>((bits >> (8 * half)) & 0xff));
      const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
      _mm256_storeu_ps(out + 8 * half, lookup8(_mm256_srli_epi32(set, 31)));  // codes 0 and 1
    }
  }
  __m256 lookup8(__m256i codes) const {
    // Bit 3 of the code, moved to the sign bit, picks the high half.
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, codes), _mm256_permutevar8x32_ps(high, codes),
                            _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
  }
#endif
};

// Packs code(x[i]) = #{j : borders[j] < x[i]} for i < n, over the 2**kBits - 1 sorted float32
// borders, into (n + 7) / 8 * kBits bytes at out; NaN gets 0 (it compares false) and the padding of
// the last group is 0, as in the reference.
template <int64_t kBits>
inline void pack_codes(const float* x, int64_t n, const float* borders, uint8_t* out) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t width = V::size();
  constexpr int64_t num_borders = (int64_t{1} << kBits) - 1;
  if constexpr (kBits <= 4) {
    V border_vecs[num_borders];
    for (int64_t j = 0; j < num_borders; ++j) {
      border_vecs[j] = V(borders[j]);
    }
    for (int64_t i = 0; i < n; i += kSwarCodes, out += 2 * kBits) {
      const int64_t count = std::min(kSwarCodes, n - i);
      alignas(64) float tail[kSwarCodes];
      const float* xs = x + i;
      if (count < kSwarCodes) {  // NaN pads the last group: its code is 0, as the reference's padding
        std::fill(std::copy(xs, xs + count, tail), tail + kSwarCodes, std::numeric_limits<float>::quiet_NaN());
        xs = tail;
      }
      uint64_t words;
      if constexpr (kBits == 1) {
        words = sign_words(xs, borders[0]);
      } else {
        words = swar_words<kBits>(code_bytes<kBits>(xs, border_vecs));
      }
      if (count == kSwarCodes) {
        std::memcpy(out, &words, 2 * kBits);  // a constant size: plain stores
      } else {
        std::memcpy(out, &words, (count + 7) / 8 * kBits);
      }
    }
  } else {
    // 255 borders: a branchless binary search, one gather a halving; a code is a byte.
    using VI = at::vec::Vectorized<int32_t>;
    for (int64_t i = 0; i < n; i += width) {
      const int64_t count = std::min(width, n - i);
      const V xv = count == width ? V::loadu(x + i) : V::loadu(x + i, count);
      VI pos(0);
      for (int32_t step = 1 << (kBits - 1); step > 0; step >>= 1) {
        const V border = at::vec::gather<sizeof(float)>(borders, pos + VI(step - 1));
        pos = pos + (at::vec::cast<int32_t>(border < xv) & VI(step));
      }
      alignas(64) int32_t codes[width];
      pos.store(codes);
      const int64_t padded = std::min(width, (count + 7) / 8 * 8);
      for (int64_t k = 0; k < padded; ++k) {
        out[i + k] = k < count ? static_cast<uint8_t>(codes[k]) : 0;
      }
    }
  }
}

// out[i] = table[code i] for the n codes packed at `packed` (whole groups; n may end mid-group).
// table holds 2**kBits values (float: at least 16, the rest never read).
template <int64_t kBits, typename T>
inline void lookup_codes(const uint8_t* packed, int64_t n, const T* table, T* out) {
  if constexpr (kBits <= 4 && std::is_same_v<T, float>) {
    const LevelVectors levels(table);
    for (int64_t i = 0; i < n; i += kSwarCodes, packed += 2 * kBits) {
      const int64_t count = std::min(kSwarCodes, n - i);
      const auto lookup = [&](uint64_t words, float* dst) {
        if constexpr (kBits == 1) {
          levels.lookup_bits(words, dst);
        } else {
          levels.lookup(unswar_words<kBits>(words), dst);
        }
      };
      if (count == kSwarCodes) {
        lookup(load_bytes<2 * kBits>(packed), out + i);
      } else {
        uint64_t words = 0;
        std::memcpy(&words, packed, (count + 7) / 8 * kBits);
        alignas(64) float tail[kSwarCodes];
        lookup(words, tail);
        std::copy(tail, tail + count, out + i);
      }
    }
  } else {
    alignas(64) int32_t codes[8];
    for (int64_t i = 0; i < n; i += 8) {
      unpack_groups<kBits>(packed + i / 8 * kBits, 1, codes);
      for (int64_t k = 0; k < std::min<int64_t>(8, n - i); ++k) {
        out[i + k] = table[codes[k]];
      }
    }
  }
}

}  // namespace memkernels::cpu::CPU_CAPABILITY
