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
#include <utility>

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

// ---- two groups at a time ----
// 16 codes are packed at once, into 2 kBits bytes. On AVX512 up to 4 bits the search's comparison
// masks are deposited at their bits (BroadcastTree::code_words); otherwise the codes go through one
// 128-bit register as bytes, group g in bytes [8g, 8g + 8), and multiply-adds gather a group's 8
// fields into its low kBits bytes (swar_words). VectorLevels spreads them back with a shift per lane.
constexpr int64_t kSwarCodes = 16;

// The 2**kBits - 1 sorted borders as an implicit search tree stored level by level: level l holds
// the 2**l borders borders[(2m + 1) * 2**(kBits - 1 - l) - 1], m < 2**l, from offset 2**l - 1, so
// that each step of a binary search reads one level, indexed by the code bits found so far. A level
// of up to 16 (AVX512) or 8 (AVX2) borders is one register permute, not a gather.
struct BorderTree {
  // 16 floats past the last level: a level is read with whole-vector loads.
  alignas(64) float nodes[256 + 16] = {};

  BorderTree(const float* borders, int64_t bits) {
    for (int64_t level = 0; level < bits; ++level) {
      const int64_t step = int64_t{1} << (bits - 1 - level);
      for (int64_t m = 0; m < (int64_t{1} << level); ++m) {
        nodes[(int64_t{1} << level) - 1 + m] = borders[(2 * m + 1) * step - 1];
      }
    }
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// level[m] per lane, for the 2**kLevel borders of a level at `level`.
template <int64_t kLevel>
inline __m512 level_lookup(const float* level, __m512i m) {
  if constexpr (kLevel <= 4) {
    return _mm512_permutexvar_ps(m, _mm512_loadu_ps(level));
  } else {
    // 32 borders a two-register permute; larger levels pick their 32-border chunk by m >> 5.
    const __m512i chunk = _mm512_srli_epi32(m, 5);
    __m512 border = _mm512_permutex2var_ps(_mm512_loadu_ps(level), m, _mm512_loadu_ps(level + 16));
    for (int c = 1; c < (1 << (kLevel - 5)); ++c) {
      const __m512 candidate =
          _mm512_permutex2var_ps(_mm512_loadu_ps(level + 32 * c), m, _mm512_loadu_ps(level + 32 * c + 16));
      border = _mm512_mask_mov_ps(border, _mm512_cmpeq_epi32_mask(chunk, _mm512_set1_epi32(c)), candidate);
    }
    return border;
  }
}
// code + (border < x ? value : 0) per lane, and code >> bits: the steps of search_codes below.
inline __m512i add_where_below(__m512i code, __m512 border, __m512 x, int value) {
  return _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(border, x, _CMP_LT_OQ), code, _mm512_set1_epi32(value));
}
inline __m512i shift_codes(__m512i code, int bits) { return _mm512_srli_epi32(code, bits); }
using SearchFloats = __m512;
using SearchCodes = __m512i;
#else
template <int64_t kLevel>
inline __m256 level_lookup(const float* level, __m256i m) {
  if constexpr (kLevel <= 3) {
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(level), m);
  } else {
    return _mm256_i32gather_ps(level, m, sizeof(float));
  }
}
inline __m256i add_where_below(__m256i code, __m256 border, __m256 x, int value) {
  const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(border, x, _CMP_LT_OQ));  // all ones where true
  return _mm256_add_epi32(code, _mm256_and_si256(below, _mm256_set1_epi32(value)));
}
inline __m256i shift_codes(__m256i code, int bits) { return _mm256_srli_epi32(code, bits); }
using SearchFloats = __m256;
using SearchCodes = __m256i;
#endif

// #{j : borders[j] < x} per lane (NaN compares false: 0), by binary search in the tree.
template <int64_t kBits, int64_t kLevel = 0>
inline SearchCodes search_codes(SearchFloats x, const float* nodes, SearchCodes code = SearchCodes()) {
  if constexpr (kLevel == kBits) {
    return code;
  } else {
    // The code found so far, shifted down, is the index of the node within this level.
    const SearchFloats border = level_lookup<kLevel>(nodes + (1 << kLevel) - 1, shift_codes(code, kBits - kLevel));
    code = add_where_below(code, border, x, 1 << (kBits - 1 - kLevel));
    return search_codes<kBits, kLevel + 1>(x, nodes, code);
  }
}

// The bytes of the 16 codes #{j : borders[j] < x[i]} (NaN compares false: 0) of x[0, 16).
template <int64_t kBits>
inline __m128i code_bytes(const float* x, const BorderTree& tree) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_epi8(search_codes<kBits>(_mm512_loadu_ps(x), tree.nodes));
#else
  const __m256i lo = search_codes<kBits>(_mm256_loadu_ps(x), tree.nodes);
  const __m256i hi = search_codes<kBits>(_mm256_loadu_ps(x + 8), tree.nodes);
  return _mm_packus_epi16(
      _mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)),
      _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// The same search for kBits <= 4 (at most 15 borders, one register each): a step picks its border
// by blending the nodes of its level on the comparison masks found so far, which are the code's
// bits, so no code vector has to index a permute and be narrowed to bytes.
template <int64_t kBits>
struct BroadcastTree {
  static_assert(kBits <= 4, "up to 15 borders in registers");
  __m512 nodes[(1 << kBits) - 1];

  // The node of `level` each lane compares with, from found[l] for l < level (the comparison at
  // level l is code bit kBits - 1 - l): the node's index within its level is those bits, found[0]
  // the highest, so the candidates are halved on the lowest bit first.
  __attribute__((always_inline)) __m512 node(int level, const __mmask16* found) const {
    __m512 candidates[8];
    int count = 1 << level;
#pragma GCC unroll 8
    for (int i = 0; i < count; ++i) {
      candidates[i] = nodes[count - 1 + i];
    }
#pragma GCC unroll 4
    for (int bit = level - 1; bit >= 0; --bit) {
      count /= 2;
#pragma GCC unroll 4
      for (int i = 0; i < count; ++i) {
        candidates[i] = _mm512_mask_blend_ps(found[bit], candidates[2 * i], candidates[2 * i + 1]);
      }
    }
    return candidates[0];
  }

  explicit BroadcastTree(const BorderTree& tree) {
    for (int i = 0; i < (1 << kBits) - 1; ++i) {
      nodes[i] = _mm512_set1_ps(tree.nodes[i]);
    }
  }
  // The 16 codes of xv packed (two groups, as swar_words gives them). The comparison mask
  // of level l holds bit kBits - 1 - l of every code, and packing places code i at bit kBits * i:
  // each mask is deposited (PDEP) at every kBits-th bit, from that offset.
  __attribute__((always_inline)) uint64_t code_words(__m512 xv) const {
    __mmask16 found[kBits];
    uint64_t words = 0;
#pragma GCC unroll 4
    for (int level = 0; level < kBits; ++level) {
      found[level] = _mm512_cmp_ps_mask(node(level, found), xv, _CMP_LT_OQ);
      words |= _pdep_u64(found[level], every_kth_bit() << (kBits - 1 - level));
    }
    return words;
  }
  // Bits 0, kBits, 2 kBits, ... of 16 codes.
  static constexpr uint64_t every_kth_bit() {
    uint64_t bits = 0;
    for (int i = 0; i < 16; ++i) {
      bits |= uint64_t{1} << (kBits * i);
    }
    return bits;
  }
};

// The codes of the first `count` (<= 16) lanes of x packed at out: 2 kBits bytes, or
// (count + 7) / 8 * kBits for fewer lanes, the last group padded with NaN's code 0 as in the
// reference. Kernels that have x in a register pack it here, with no second pass over a buffer.
// followed: the same thread packs the next lanes' codes (at least one group, kBits bytes) at
// out + 2 kBits afterwards. 3-bit codes then go out as one 8-byte store, whose last 2 bytes those
// overwrite, instead of a 4- and a 2-byte store: in a bfloat16 forward the split store cost as
// much again as computing the codes.
template <int64_t kBits>
__attribute__((always_inline)) inline void pack_vector_codes(const BroadcastTree<kBits>& tree, __m512 x,
                                                             int64_t count, uint8_t* out, bool followed) {
  if (count < kSwarCodes) {
    const auto valid = static_cast<__mmask16>((1u << count) - 1);
    x = _mm512_mask_mov_ps(_mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()), valid, x);
  }
  const uint64_t words = tree.code_words(x);
  if (kBits == 3 && count == kSwarCodes && followed) {
    std::memcpy(out, &words, sizeof(words));
  } else if (count == kSwarCodes) {
    std::memcpy(out, &words, 2 * kBits);  // a constant size: plain stores
  } else {
    std::memcpy(out, &words, (count + 7) / 8 * kBits);
  }
}
#endif

// 1-bit codes of x[0, 16) on AVX2: bit i is borders[0] < x[i] (NaN: 0), so the 16 comparison bits
// are already the two packed groups, with no byte-wise counting.
inline uint64_t sign_words(const float* x, float border) {
  const __m256 b = _mm256_set1_ps(border);
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), b, _CMP_GT_OQ));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8), b, _CMP_GT_OQ));
  return static_cast<uint64_t>(lo | hi << 8);
}

// The two groups of code bytes packed: group 0 in bytes [0, kBits), group 1 in [kBits, 2 kBits).
// Neighbouring fields are joined by multiply-adds (pairs of bytes into 16-bit lanes, pairs of those
// into 32-bit lanes, exact since the fields do not overlap), then the two halves of each 64-bit lane.
template <int64_t kBits>
inline uint64_t swar_words(__m128i b) {
  b = _mm_maddubs_epi16(b, _mm_set1_epi16(static_cast<int16_t>(1 | 1 << (8 + kBits))));
  b = _mm_madd_epi16(b, _mm_set1_epi32(1 | 1 << (16 + 2 * kBits)));
  b = _mm_or_si128(b, _mm_srli_epi64(b, 32 - 4 * kBits));
  constexpr uint64_t group_mask = (uint64_t{1} << (8 * kBits)) - 1;
  return (static_cast<uint64_t>(_mm_cvtsi128_si64(b)) & group_mask) |
         (static_cast<uint64_t>(_mm_extract_epi64(b, 1)) << (8 * kBits));
}

// The little-endian integer of the kBytes (1, 2, 3, 4, 6 or 8) bytes at p, in loads of whole
// integers (a memcpy into a zeroed word would store and reload it: a store-forwarding stall every
// vector).
template <int64_t kBytes>
inline uint64_t load_bytes(const uint8_t* p) {
  if constexpr (kBytes == 3 || kBytes == 6) {
    constexpr int64_t kLow = kBytes / 3 * 2;  // 2 + 1 or 4 + 2 bytes
    return load_bytes<kLow>(p) | load_bytes<kBytes - kLow>(p + kLow) << (8 * kLow);
  } else {
    std::conditional_t<kBytes == 1, uint8_t,
                       std::conditional_t<kBytes == 2, uint16_t, std::conditional_t<kBytes == 4, uint32_t, uint64_t>>>
        word;
    static_assert(sizeof(word) == kBytes, "1, 2, 3, 4, 6 or 8 bytes");
    std::memcpy(&word, p, kBytes);
    return word;
  }
}

// table[code] for the codes of one float vector's worth of elements (16 on AVX512, 8 on AVX2: whole
// groups), looked up in registers as the vector is computed, with no pass over a buffer. Up to 4
// bits the table is one or two registers of 16 levels, replicated so that lane j holds
// table[j mod 2**kBits]: a lane's code need not be masked, as a permute reads only the low bits of
// its index and the bits above the code (the next codes') then pick a copy of the same level.
// 8 bits: a gather from the table in memory.
template <int64_t kBits>
struct VectorLevels {
  static constexpr int64_t kWidth = at::vec::Vectorized<float>::size();
  static constexpr int64_t kBytes = kWidth / 8 * kBits;  // the packed codes of a vector

  // The codes of the vector whose first group is at `packed`: all of its groups (count ==
  // kWidth) or the (count + 7) / 8 groups of its first `count` elements, the rest 0. followed: at
  // least a group of codes follows the vector's, which a load of whole words may then read into.
  static auto codes(const uint8_t* packed, int64_t count, bool followed) {
    if constexpr (kBits == 8) {
      __m128i bytes = _mm_setzero_si128();
      if (count == kWidth) {
        std::memcpy(&bytes, packed, kBytes);
      } else {
        std::memcpy(&bytes, packed, (count + 7) / 8 * kBits);
      }
#if defined(CPU_CAPABILITY_AVX512)
      return _mm512_cvtepu8_epi32(bytes);
#else
      return _mm256_cvtepu8_epi32(bytes);
#endif
    } else {
      // Whole words where they may be read: 2 to 4 bits, each group's codes loaded as 32 bits
      // straight into its lanes (a broadcasting load, no move from a general register), reading up
      // to 2 bytes past them.
      const bool word_loads = kBits >= 2 && count == kWidth && (followed || kBits == 4);
      uint64_t words = 0;
      if (!word_loads && count == kWidth) {
        words = load_bytes<kBytes>(packed);
      } else if (!word_loads) {
        std::memcpy(&words, packed, (count + 7) / 8 * kBits);
      }
      // Each lane shifts its group's word right by its slot's offset.
      constexpr int k = static_cast<int>(kBits);
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kBits == 1) {
        return static_cast<__mmask16>(words);  // the 16 bits are the codes
      } else {
        const __m512i slot_shifts = _mm512_setr_epi32(0, k, 2 * k, 3 * k, 4 * k, 5 * k, 6 * k, 7 * k,  //
                                                      0, k, 2 * k, 3 * k, 4 * k, 5 * k, 6 * k, 7 * k);
        const uint32_t group0 = word_loads ? load_bytes<4>(packed) : static_cast<uint32_t>(words & kGroupMask);
        const uint32_t group1 = word_loads ? load_bytes<4>(packed + kBits) : static_cast<uint32_t>(words >> (8 * kBits));
        return _mm512_srlv_epi32(
            _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(group0)), 0xff00, static_cast<int>(group1)),
            slot_shifts);
      }
#else
      const __m256i slot_shifts = _mm256_setr_epi32(0, k, 2 * k, 3 * k, 4 * k, 5 * k, 6 * k, 7 * k);
      const uint32_t group = word_loads ? load_bytes<4>(packed) : static_cast<uint32_t>(words);
      return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(group)), slot_shifts);
#endif
    }
  }

  template <typename Codes>
  at::vec::Vectorized<float> lookup(const Codes& codes) const {
    if constexpr (kBits == 8) {
#if defined(CPU_CAPABILITY_AVX512)
      return _mm512_i32gather_ps(codes, table, sizeof(float));
#else
      return _mm256_i32gather_ps(table, codes, sizeof(float));
#endif
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kBits == 1) {
        return _mm512_permutexvar_ps(_mm512_maskz_set1_epi32(codes, 1), levels);
      } else {
        return _mm512_permutexvar_ps(codes, levels);
      }
#else
      // Bit 3 of the index, moved to the sign bit, picks the high half.
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, codes), _mm256_permutevar8x32_ps(high, codes),
                              _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
#endif
    }
  }

  // table: 2**kBits levels.
  explicit VectorLevels(const float* table_) : table(table_) {
    if constexpr (kBits <= 4) {
      alignas(64) float replicated[16];
      for (int j = 0; j < 16; ++j) {
        replicated[j] = table[j % (1 << kBits)];
      }
#if defined(CPU_CAPABILITY_AVX512)
      levels = _mm512_load_ps(replicated);
#else
      low = _mm256_load_ps(replicated);
      high = _mm256_load_ps(replicated + 8);
#endif
    }
  }

 private:
  static constexpr uint64_t kGroupMask = (uint64_t{1} << (8 * kBits)) - 1;
  const float* table;
#if defined(CPU_CAPABILITY_AVX512)
  __m512 levels;
#else
  __m256 low, high;  // levels [0, 8) and [8, 16)
#endif
};

// pack_codes by a search per group pair: AVX2, and 8 bits on AVX512 (the tree searched in memory).
template <int64_t kBits>
inline void search_and_pack_codes(const float* x, int64_t n, const BorderTree& tree, uint8_t* out) {
  for (int64_t i = 0; i < n; i += kSwarCodes, out += 2 * kBits) {
    const int64_t count = std::min(kSwarCodes, n - i);
    alignas(64) float tail[kSwarCodes];
    const float* xs = x + i;
    if (count < kSwarCodes) {  // NaN pads the last group: its code is 0, as the reference's padding
      std::fill(std::copy(xs, xs + count, tail), tail + kSwarCodes, std::numeric_limits<float>::quiet_NaN());
      xs = tail;
    }
    const int64_t nbytes = count == kSwarCodes ? 2 * kBits : (count + 7) / 8 * kBits;
    if constexpr (kBits == 8) {  // a code is a byte
      const __m128i bytes = code_bytes<kBits>(xs, tree);
      if (count == kSwarCodes) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bytes);
      } else {
        std::memcpy(out, &bytes, nbytes);
      }
    } else {
      uint64_t words;
      if constexpr (kBits == 1) {
        words = sign_words(xs, tree.nodes[0]);
      } else {
        words = swar_words<kBits>(code_bytes<kBits>(xs, tree));
      }
      if (count == kSwarCodes) {
        std::memcpy(out, &words, 2 * kBits);  // a constant size: plain stores
      } else {
        std::memcpy(out, &words, nbytes);
      }
    }
  }
}

// Packs code(x[i]) = #{j : borders[j] < x[i]} for i < n, over the 2**kBits - 1 sorted float32
// borders of `tree`, into (n + 7) / 8 * kBits bytes at out; NaN gets 0 (it compares false) and the
// padding of the last group is 0, as in the reference. 16 codes (two groups) at a time.
template <int64_t kBits>
inline void pack_codes(const float* x, int64_t n, const BorderTree& tree, uint8_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kBits <= 4) {
    const BroadcastTree<kBits> borders(tree);
    for (int64_t i = 0; i < n; i += kSwarCodes) {
      const int64_t count = std::min(kSwarCodes, n - i);
      const __m512 xv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), x + i);
      pack_vector_codes(borders, xv, count, out + i / 8 * kBits, i + kSwarCodes < n);
    }
  } else {
    search_and_pack_codes<kBits>(x, n, tree, out);
  }
#else
  search_and_pack_codes<kBits>(x, n, tree, out);
#endif
}

}  // namespace memkernels::cpu::CPU_CAPABILITY
