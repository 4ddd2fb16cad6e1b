// The AVX512 kernels of activation_kernels.h. This file alone is compiled for AVX512 (the
// instruction sets of ATen's own AVX512 kernels, on top of the command line's AVX2/FMA/F16C, and
// BMI2's bit deposit for the codes, which every AVX512 CPU has), with
// ATen's AVX512 Vectorized and Sleef's AVX512 functions from libtorch; activation_kernels() runs
// these only where ATen finds AVX512. A pragma rather than per-file flags, so that setup.py and
// CMakeLists.txt build every source alike; GCC's pragma does not define the instruction sets'
// macros, which ATen's and Sleef's headers test, so they are defined here to match it.
// activation_kernels_avx512_bf16.cpp compiles this file again with MEMKERNELS_AVX512_BF16.
#if !defined(__GNUC__) || defined(__clang__)
#error "activation_kernels_avx512.cpp selects AVX512 with GCC's #pragma GCC target"
#endif
// Every header without ISA-specific code comes before the pragma: GCC 13 and 14 give the implicit
// members of std classes defined under it the default target and then refuse to inline the pragma's
// always_inline std functions into them ("target specific option mismatch"; GCC 12 and 14.2 don't).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/Math.h>
#include <c10/util/BFloat16-math.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#if defined(MEMKERNELS_AVX512_BF16)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2,avx512bf16")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2")
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#if defined(MEMKERNELS_AVX512_BF16)
#define CPU_CAPABILITY AVX512_BF16
#else
#define CPU_CAPABILITY AVX512
#endif
#define CPU_CAPABILITY_AVX512
#include "cpu/activation_kernels_impl.h"
