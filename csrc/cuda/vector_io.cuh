// Vector loads and stores of N consecutive elements, for the CUDA C++ kernels: naturally aligned
// accesses of up to 16 bytes each (one for 8 or 16 bytes, several for a larger group) where the
// pointers allow it and the N elements lie before the end, element by element otherwise.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace memkernels::cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Group {
  T v[N];
};

// Elements [first, first + N) of p as acc_t (0 past numel).
template <typename T, typename acc_t, int N>
__device__ __forceinline__ void load_group(const T* __restrict__ p, int64_t first, int64_t numel, bool vec,
                                           acc_t (&out)[N]) {
  if (vec && first + N <= numel) {
    const Group<T, N> g = *reinterpret_cast<const Group<T, N>*>(p + first);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = static_cast<acc_t>(g.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      out[i] = first + i < numel ? static_cast<acc_t>(p[first + i]) : acc_t(0);
    }
  }
}

// Elements [first, first + N) of p from in (none past numel).
template <typename T, typename acc_t, int N>
__device__ __forceinline__ void store_group(T* __restrict__ p, int64_t first, int64_t numel, bool vec,
                                            const acc_t (&in)[N]) {
  if (vec && first + N <= numel) {
    Group<T, N> g;
#pragma unroll
    for (int i = 0; i < N; ++i) g.v[i] = static_cast<T>(in[i]);
    // Stored as 16- (or 8-) byte words through __stwb (st.global.wb, a plain store): assigning g
    // itself, nvcc split it into element stores where the index arithmetic hid the alignment
    // (feedback.cu's tiles).
    using Word = std::conditional_t<sizeof(g) % 16 == 0, uint4, uint2>;
    static_assert(sizeof(g) % sizeof(Word) == 0, "a group is whole 8- or 16-byte words");
    Word words[sizeof(g) / sizeof(Word)];
    __builtin_memcpy(words, &g, sizeof(g));
#pragma unroll
    for (size_t i = 0; i < sizeof(g) / sizeof(Word); ++i) __stwb(reinterpret_cast<Word*>(p + first) + i, words[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (first + i < numel) p[first + i] = static_cast<T>(in[i]);
    }
  }
}

// Whether every pointer (nullptr: absent) is aligned to group_bytes.
inline bool vector_aligned(std::initializer_list<const void*> pointers, size_t group_bytes) {
  return std::all_of(pointers.begin(), pointers.end(), [&](const void* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % group_bytes == 0;
  });
}

}  // namespace memkernels::cuda
