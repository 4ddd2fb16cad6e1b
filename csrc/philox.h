// Philox4x32-10 as Triton's tl.randint4x computes it, for host and device code: the generator of the
// random feedback matrices (memkernels/reference.py, "random feedback matrices", is the spec).
// B[row, col] of layer `layer` is word (row % 4) of philox(counter = (offset, offset >> 32, 0, 0),
// key = (seed, layer)), offset = (row / 4) * cols + col, read as int32 and times scale * 2**-31.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MEMKERNELS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MEMKERNELS_HOST_DEVICE inline
#endif

namespace memkernels {

struct PhiloxWords {
  uint32_t w[4];
};

MEMKERNELS_HOST_DEVICE uint32_t mul_hi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four words for counter (c0, c1, c2, c3) under key (k0, k1): triton.language.random.philox_impl,
// and ATen's at::Philox4_32 (offset in c0, c1; subsequence in c2, c3), which quantize_groups keys.
MEMKERNELS_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                 uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t next0 = mul_hi(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const uint32_t next2 = mul_hi(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// The four words for 64-bit counter `offset` (c2 = c3 = 0): the feedback matrices' generator.
MEMKERNELS_HOST_DEVICE PhiloxWords philox4x32_10(uint64_t offset, uint32_t k0, uint32_t k1) {
  return philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u, k0, k1);
}

// One entry of B from its Philox word: float32(int32(word)) * step, step = float32(scale) * 2**-31.
// Both factors are exact float32 numbers, so the one rounding is the same on every device.
MEMKERNELS_HOST_DEVICE float feedback_entry(uint32_t word, float step) {
  return static_cast<float>(static_cast<int32_t>(word)) * step;
}

}  // namespace memkernels
