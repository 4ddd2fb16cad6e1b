// CUDA C++ kernel of the auxiliary sign activation (Woo & Jeon, ICLR 2023), the op
// auxiliary_sign_forward of csrc/ops.cpp: x_aux = x + eps * s(x) with s(x) = +1 / -1 for x > 0 /
// otherwise (1 / 0 when `nonnegative`), and the signs [x > 0] packed 1 bit a value, each row of
// x [rows, cols] into ceil(cols / 8) bytes (value c at bit c % 8 of byte c / 8, the layout of
// memkernels/reference.py). The other compress ops run Triton (memkernels/triton/compress.py).
//
// A warp takes 32 consecutive columns of a row (a grid-stride loop over such chunks, int64
// indices): every lane loads one value and writes x_aux, and __ballot_sync gathers the 32 sign
// bits, which are exactly the 4 little-endian bytes of the chunk in the packed row. Lane 0 stores
// them as one word where the row's byte count is a multiple of 4 (the word is then aligned);
// otherwise lanes 0-3 store a byte each, dropping bytes past the row's end.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "activations.h"
#include "cuda/kernels.h"

namespace memkernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kSignThreads = 256;
constexpr int kWarpsPerBlock = kSignThreads / kWarp;

// eps is added in the compute type acc_t: float for half, bfloat16 and float (eps rounded to
// float), double for double (eps whole), as the reference's eps * s in its compute dtype.
template <typename scalar_t>
__global__ void __launch_bounds__(kSignThreads)
auxiliary_sign_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ x_aux,
                      uint8_t* __restrict__ signs, int64_t rows, int64_t cols,
                      at::opmath_type<scalar_t> eps, bool nonnegative) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t chunks_per_row = (cols + kWarp - 1) / kWarp;
  const int64_t row_bytes = packed_nbytes(cols, 1);
  const bool word_stores = row_bytes % 4 == 0;
  const int64_t chunks = rows * chunks_per_row;
  // The loop bound is the same for every lane of a warp, so each ballot has the whole warp.
  for (int64_t chunk = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; chunk < chunks;
       chunk += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t row = chunk / chunks_per_row;
    const int64_t first = (chunk % chunks_per_row) * kWarp;
    const int64_t col = first + lane;
    const bool valid = col < cols;
    const int64_t at = row * cols + col;
    const acc_t v = valid ? static_cast<acc_t>(x[at]) : acc_t(0);
    const bool positive = v > acc_t(0);  // NaN: false
    if (valid) {
      const acc_t s = positive ? acc_t(1) : (nonnegative ? acc_t(0) : acc_t(-1));
      x_aux[at] = static_cast<scalar_t>(v + eps * s);
    }
    const uint32_t bits = __ballot_sync(0xFFFFFFFFu, positive);
    uint8_t* out = signs + row * row_bytes + first / 8;
    if (word_stores) {
      // first / 8 is a multiple of 4 and so is row * row_bytes: an aligned word, wholly in the row.
      if (lane == 0) *reinterpret_cast<uint32_t*>(out) = bits;
    } else if (lane < 4 && first / 8 + lane < row_bytes) {
      out[lane] = static_cast<uint8_t>(bits >> (8 * lane));
    }
  }
}

// Enough blocks to fill the device; the grid-stride loop covers the rest.
int sign_blocks(int64_t chunks) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((chunks + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                             int64_t(sms) * 16)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> auxiliary_sign_forward(const at::Tensor& x_in, double eps,
                                                          bool nonnegative) {
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor, got ", x_in.device());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              "x must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [rows, cols], got shape ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor x_aux = at::empty({rows, cols}, x.options());
  at::Tensor signs = at::empty({rows, packed_nbytes(cols, 1)}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {x_aux, signs};
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = rows * ((cols + kWarp - 1) / kWarp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "auxiliary_sign_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // float inputs add eps rounded to float; double adds it whole.
    const acc_t eps_acc = std::is_same_v<acc_t, double> ? acc_t(eps)
                                                        : acc_t(static_cast<float>(eps));
    auxiliary_sign_kernel<scalar_t><<<sign_blocks(chunks), kSignThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x_aux.mutable_data_ptr<scalar_t>(),
        signs.mutable_data_ptr<uint8_t>(), rows, cols, eps_acc, nonnegative);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_aux, signs};
}

}  // namespace memkernels::cuda
