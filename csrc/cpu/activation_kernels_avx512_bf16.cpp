// The AVX512 kernels of activation_kernels.h once more, for CPUs with AVX512-BF16 too (Zen 4,
// Cooper Lake, Sapphire Rapids and later): bfloat16 results are rounded by one instruction,
// vcvtneps2bf16 (float_to_bf16), where the AVX512 build takes six. As activation_kernels_avx512.cpp
// (which see), under a namespace of its own, AVX512_BF16 (ATen's Vectorized too), so that no
// function compiled here for AVX512-BF16 stands in for one of the plain AVX512 build at link time.
#if !defined(__GNUC__) || defined(__clang__)
#error "activation_kernels_avx512_bf16.cpp selects AVX512 with GCC's #pragma GCC target"
#endif
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2,avx512bf16")
#ifndef __AVX512F__
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#define MEMKERNELS_AVX512_BF16
#include "cpu/activation_kernels_impl.h"
