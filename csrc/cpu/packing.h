// k-bit codes on CPU: the packed layout of memkernels/reference.py and the codes of an activation.
//
// Layout: element i is in group g = i / 8 at slot j = i % 8, bits [j*k, j*k + k) of the
// little-endian integer formed by the k bytes packed[g*k, g*k + k). Kernels pack and unpack whole
// groups; a tile of kTile elements holds kTile / 8 groups.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "activations.h"

namespace memkernels::cpu {

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

// spread[m]: the 8 bits of m moved to the low bits of 8 fields of kBits bits (field j = bit j of m).
template <int64_t kBits>
struct SpreadTable {
  uint32_t spread[256];
  constexpr SpreadTable() : spread() {
    for (uint32_t m = 0; m < 256; ++m) {
      for (uint32_t j = 0; j < 8; ++j) {
        spread[m] |= ((m >> j) & 1u) << (j * kBits);
      }
    }
  }
};

// Packs code(x[i]) = #{j : borders[j] < x[i]} for i < n, over the 2**kBits - 1 sorted float32
// borders, into (n + 7) / 8 * kBits bytes at out; NaN gets 0 (it compares false) and the padding of
// the last group is 0, as in the reference.
template <int64_t kBits>
inline void pack_codes(const float* x, int64_t n, const float* borders, uint8_t* out) {
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  constexpr int64_t width = V::size();
  constexpr int64_t groups_per_vec = width / 8;
  static_assert(width % 8 == 0, "a vector holds whole groups of 8");
  constexpr int64_t num_borders = (int64_t{1} << kBits) - 1;
  if constexpr (kBits <= 4) {
    // Bit-sliced count: the lanes with x > borders[j] form a bit mask; spreading each group's 8 bits
    // into its 8 fields and summing over j gives the packed word (a field's sum is < 2**kBits).
    static constexpr SpreadTable<kBits> table;
    V border_vecs[num_borders];
    for (int64_t j = 0; j < num_borders; ++j) {
      border_vecs[j] = V(borders[j]);
    }
    for (int64_t i = 0; i < n; i += width, out += groups_per_vec * kBits) {
      const int64_t count = std::min(width, n - i);
      const V xv = count == width ? V::loadu(x + i) : V::loadu(x + i, count);
      const uint64_t valid = count == width ? ~uint64_t{0} : (uint64_t{1} << count) - 1;
      uint32_t words[groups_per_vec] = {};
      for (int64_t j = 0; j < num_borders; ++j) {
        // zero_mask of the compare: bit set where x > borders[j] is false (or x is NaN).
        const uint64_t above = ~static_cast<uint64_t>((xv > border_vecs[j]).zero_mask()) & valid;
        for (int64_t g = 0; g < groups_per_vec; ++g) {
          words[g] += table.spread[(above >> (8 * g)) & 0xFF];
        }
      }
      for (int64_t g = 0; g < std::min(groups_per_vec, (count + 7) / 8); ++g) {
        for (int64_t b = 0; b < kBits; ++b) {
          out[g * kBits + b] = static_cast<uint8_t>(words[g] >> (8 * b));
        }
      }
    }
  } else {
    // 255 borders: a branchless binary search, one gather a halving; a code is a byte.
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
template <int64_t kBits, typename T>
inline void lookup_codes(const uint8_t* packed, int64_t n, const T* table, T* out) {
  using V = at::vec::Vectorized<T>;
  using VI = at::vec::Vectorized<int32_t>;
  if constexpr (kBits <= 4 && std::is_same_v<T, float> && V::size() == 8) {
    // One group a vector: broadcast its word, shift each lane to its field, gather the levels.
    alignas(32) static constexpr int32_t field_shifts[8] = {0, kBits, 2 * kBits, 3 * kBits,
                                                            4 * kBits, 5 * kBits, 6 * kBits, 7 * kBits};
    const VI shifts = VI::loadu(field_shifts);
    const VI mask((1 << kBits) - 1);
    for (int64_t i = 0; i < n; i += 8, packed += kBits) {
      int32_t word = 0;
      for (int64_t b = 0; b < kBits; ++b) {
        word |= static_cast<int32_t>(packed[b]) << (8 * b);
      }
      const V levels = at::vec::gather<sizeof(float)>(table, (VI(word) >> shifts) & mask);
      if (n - i >= 8) {
        levels.store(out + i);
      } else {
        levels.store(out + i, n - i);
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

}  // namespace memkernels::cpu
