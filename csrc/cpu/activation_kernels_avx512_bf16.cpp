// The AVX512 kernels of activation_kernels.h once more, for CPUs with AVX512-BF16 too (Zen 4,
// Cooper Lake, Sapphire Rapids and later): bfloat16 results are rounded by one instruction,
// vcvtneps2bf16 (float_to_bf16), where the AVX512 build takes six. Under a namespace of its own,
// AVX512_BF16 (ATen's Vectorized too), so that no function compiled here for AVX512-BF16 stands in
// for one of the plain AVX512 build at link time.
#define MEMKERNELS_AVX512_BF16
#include "cpu/activation_kernels_avx512.cpp"
