// CUDA C++ kernel of feedback_project: out = (e @ B) * derivative with B (K, M) generated from Philox
// (csrc/philox.h) inside the kernel and never stored; memkernels/reference.py is the spec.
//
// A block of 256 threads owns a 64 x 64 tile of out (rows of e x columns of B) and walks K 16 rows
// at a time: each thread runs Philox once for one (quad of rows, column) of B, giving the 4 rows of
// that column, into shared memory; e's 64 x 16 slice is staged beside it (as float); then every
// thread adds a 4 x 4 register tile of products. float32 math throughout, as the reference.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "cuda/kernels.h"
#include "cuda/vector_io.cuh"
#include "philox.h"

namespace memkernels::cuda {
namespace {

constexpr int kTile = 64;        // rows and columns of out a block owns
constexpr int kDepth = 16;       // rows of B (columns of e) a step stages: 4 quads
constexpr int kThreads = 256;    // 16 x 16 threads, 4 x 4 outputs each
constexpr int kMicro = 4;

template <typename T>
__global__ void feedback_project_kernel(const T* __restrict__ e, const T* __restrict__ derivative,
                                        T* __restrict__ out, int64_t n, int64_t k, int64_t m,
                                        int64_t e_stride_row, int64_t e_stride_col, uint32_t seed,
                                        uint32_t layer, float step, bool vec) {
  __shared__ float e_tile[kTile][kDepth + 1];  // +1: threads of a warp read one column of it
  __shared__ float b_tile[kDepth][kTile];
  const int tid = threadIdx.x;
  // One flat grid axis (a y axis holds at most 65535 row tiles), column tiles fastest: the blocks
  // running together share rows of e in L2.
  const int64_t col_tiles = (m + kTile - 1) / kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) % col_tiles * kTile;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) / col_tiles * kTile;
  const int ty = tid / 16, tx = tid % 16;
  float acc[kMicro][kMicro] = {};

  for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
    {  // B: thread -> (quad, column); one Philox call gives the quad's 4 rows of the column
      const int quad = tid / kTile, col = tid % kTile;
      const uint64_t offset = static_cast<uint64_t>(k0 / 4 + quad) * static_cast<uint64_t>(m) + col0 + col;
      const PhiloxWords words = philox4x32_10(offset, seed, layer);
#pragma unroll
      for (int w = 0; w < 4; ++w) b_tile[quad * 4 + w][col] = feedback_entry(words.w[w], step);
    }
    for (int i = tid; i < kTile * kDepth; i += kThreads) {  // e: zero past n and k
      const int r = i / kDepth, c = i % kDepth;
      const int64_t row = row0 + r, kk = k0 + c;
      e_tile[r][c] = row < n && kk < k ? static_cast<float>(e[row * e_stride_row + kk * e_stride_col]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      float a[kMicro], b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = e_tile[ty * kMicro + i][kk];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) b[j] = b_tile[kk][tx * kMicro + j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  // A thread's 4 columns of a row are one vector load of derivative and one store of out (vec), so
  // a warp's accesses are two whole 64-column rows: this epilogue is the kernel's memory traffic
  // when K is small.
  const int64_t col = col0 + tx * kMicro;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = row0 + ty * kMicro + i;
    if (row < n) {
      if (derivative != nullptr) {
        float d[kMicro];
        load_group(derivative + row * m, col, m, vec, d);
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] *= d[j];
      }
      store_group(out + row * m, col, m, vec, acc[i]);
    }
  }
}

}  // namespace

at::Tensor feedback_project(const at::Tensor& e, int64_t seed, int64_t layer, int64_t out_features, double scale,
                            const std::optional<at::Tensor>& derivative_in) {
  TORCH_CHECK(e.is_cuda(), "e must be a CUDA tensor, got ", e.device());
  TORCH_CHECK(e.dim() == 2, "e must be 2-D (batch, K), got shape ", e.sizes());
  TORCH_CHECK(e.scalar_type() == at::kFloat || e.scalar_type() == at::kBFloat16 || e.scalar_type() == at::kHalf,
              "e must be float32, bfloat16 or float16 for the CUDA kernel, got ", e.scalar_type());
  TORCH_CHECK(seed >= 0 && seed < (int64_t{1} << 32), "seed must be in [0, 2**32), got ", seed);
  TORCH_CHECK(layer >= 0 && layer < (int64_t{1} << 31), "layer must be in [0, 2**31), got ", layer);
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)), "scale must be a finite float32, got ", scale);
  const int64_t n = e.size(0), k = e.size(1);
  at::Tensor derivative;
  if (derivative_in.has_value()) {
    TORCH_CHECK(derivative_in->device() == e.device(), "derivative must be on ", e.device(), ", got ",
                derivative_in->device());
    TORCH_CHECK(derivative_in->scalar_type() == e.scalar_type(), "derivative must have e's dtype (",
                e.scalar_type(), "), got ", derivative_in->scalar_type());
    TORCH_CHECK(derivative_in->sizes() == at::IntArrayRef({n, out_features}), "derivative must have shape (", n,
                ", ", out_features, "), got ", derivative_in->sizes());
    derivative = derivative_in->contiguous();
  }
  at::Tensor out = at::empty({n, out_features}, e.options());
  if (out.numel() == 0) {
    return out;
  }
  const int64_t tiles = ((out_features + kTile - 1) / kTile) * ((n + kTile - 1) / kTile);
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), "out has too many 64 x 64 tiles for a CUDA grid: ",
              tiles, " for (", n, ", ", out_features, ")");
  const float step = std::ldexp(static_cast<float>(scale), -31);
  const c10::cuda::CUDAGuard guard(e.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(tiles));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "feedback_project", [&] {
    const scalar_t* derivative_ptr = derivative.defined() ? derivative.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    // Rows of whole, aligned groups of kMicro elements: every thread's columns are one vector.
    const bool vec = out_features % kMicro == 0 &&
                     vector_aligned({derivative_ptr, out_ptr}, sizeof(Group<scalar_t, kMicro>));
    feedback_project_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        e.const_data_ptr<scalar_t>(), derivative_ptr, out_ptr, n, k, out_features, e.stride(0), e.stride(1),
        static_cast<uint32_t>(seed), static_cast<uint32_t>(layer), step, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace memkernels::cuda
