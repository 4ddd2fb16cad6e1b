// CPU kernel of feedback_project: out = (e @ B) * derivative with B (K, M) generated tile by tile
// from Philox (csrc/philox.h) and never stored. Semantics: memkernels/reference.py.
//
// The output is cut into blocks of kRowBlock x kColBlock, one task each (at::parallel_for). A task
// walks B's rows kTileRows at a time: it generates the tile B[k0 : k0 + kTileRows, its columns]
// into its own buffer (32 KB, in L1/L2) and adds e[rows, k0 : k0 + kTileRows] @ tile to its
// output block with a register-blocked micro-kernel. Every task of a column block regenerates its
// tiles: generation costs about as much as kRowBlock rows of multiply-adds, so this is amortised.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/philox_lanes.h"
#include "philox.h"

namespace memkernels::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kTileRows = 64;   // rows of B a tile holds (a multiple of 4: one Philox call each 4)
constexpr int64_t kColBlock = 128;  // columns of B (and of out) a task owns
constexpr int64_t kRowBlock = 256;  // rows of e (and of out) a task owns
constexpr int64_t kMicroRows = 4;   // rows of out the micro-kernel keeps in registers

constexpr int64_t kLanes = kPhiloxLanes;  // columns whose B entries one call of philox_lanes gives

// tile[r][j] = B[k0 + r, c0 + j] for r < rows, j < cols (row stride kColBlock).
template <typename acc_t>
void generate_tile(acc_t* tile, int64_t k0, int64_t rows, int64_t c0, int64_t cols, int64_t m,
                   uint32_t seed, uint32_t layer, float step) {
  uint32_t lane_words[4][kLanes];
  for (int64_t quad = k0 / 4; quad * 4 < k0 + rows; ++quad) {
    const uint64_t base = static_cast<uint64_t>(quad) * static_cast<uint64_t>(m) + c0;
    const int64_t first = quad * 4 - k0;  // tile row of the quad's word 0 (k0 is a multiple of 4)
    const int words = static_cast<int>(std::min<int64_t>(4, rows - first));
    for (int64_t j = 0; j < cols; j += kLanes) {
      philox_lanes(base + j, 0, 0, seed, layer, lane_words);
      // All 32 entries first, a fixed-length loop the compiler vectorises; then the tile's share.
      float entries[4][kLanes];
      for (int w = 0; w < 4; ++w) {
        for (int64_t lane = 0; lane < kLanes; ++lane) {
          entries[w][lane] = feedback_entry(lane_words[w][lane], step);
        }
      }
      const int64_t lanes = std::min(kLanes, cols - j);
      for (int w = 0; w < words; ++w) {
        for (int64_t lane = 0; lane < lanes; ++lane) {
          tile[(first + w) * kColBlock + j + lane] = static_cast<acc_t>(entries[w][lane]);
        }
      }
    }
  }
}

// out[r, 0:cols] += sum_k e[r, k] * tile[k, 0:cols] for r < n_rows, k < depth; rows of e have
// stride ldE, rows of out stride ldOut. NR rows of out and two vectors of columns stay in registers.
template <typename acc_t, int NR>
void micro_kernel(const acc_t* e, int64_t ldE, const acc_t* tile, int64_t depth, acc_t* out,
                  int64_t ldOut, int64_t cols) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < cols; j += 2 * W) {
    const int64_t n0 = std::min<int64_t>(W, cols - j);
    const int64_t n1 = std::clamp<int64_t>(cols - j - W, 0, W);
    Vec acc[NR][2];
    for (int r = 0; r < NR; ++r) {
      acc[r][0] = Vec::loadu(out + r * ldOut + j, n0);
      acc[r][1] = n1 > 0 ? Vec::loadu(out + r * ldOut + j + W, n1) : Vec(0);
    }
    for (int64_t k = 0; k < depth; ++k) {
      // Past `cols` the tile holds stale values; they only reach lanes that are not stored.
      const Vec t0 = Vec::loadu(tile + k * kColBlock + j);
      const Vec t1 = Vec::loadu(tile + k * kColBlock + j + W);
      for (int r = 0; r < NR; ++r) {
        const Vec a(e[r * ldE + k]);
        acc[r][0] = at::vec::fmadd(a, t0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(a, t1, acc[r][1]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      acc[r][0].store(out + r * ldOut + j, n0);
      if (n1 > 0) {
        acc[r][1].store(out + r * ldOut + j + W, n1);
      }
    }
  }
}

template <typename acc_t>
void add_tile_product(const acc_t* e, int64_t ldE, const acc_t* tile, int64_t depth, acc_t* out,
                      int64_t ldOut, int64_t n_rows, int64_t cols) {
  int64_t r = 0;
  for (; r + kMicroRows <= n_rows; r += kMicroRows) {
    micro_kernel<acc_t, kMicroRows>(e + r * ldE, ldE, tile, depth, out + r * ldOut, ldOut, cols);
  }
  for (; r < n_rows; ++r) {
    micro_kernel<acc_t, 1>(e + r * ldE, ldE, tile, depth, out + r * ldOut, ldOut, cols);
  }
}

// out (N, M) = (e (N, K) @ B) * derivative, all contiguous in acc_t; derivative may be null.
template <typename acc_t>
void project(const acc_t* e, int64_t n, int64_t k, acc_t* out, int64_t m, const acc_t* derivative,
             uint32_t seed, uint32_t layer, float step) {
  const int64_t row_blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t col_blocks = (m + kColBlock - 1) / kColBlock;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    // The tile is padded by a vector: the micro-kernel reads two whole vectors past a short row.
    std::vector<acc_t> tile(kTileRows * kColBlock + 2 * at::vec::Vectorized<acc_t>::size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = (task / col_blocks) * kRowBlock, c0 = (task % col_blocks) * kColBlock;
      const int64_t rows = std::min(kRowBlock, n - r0), cols = std::min(kColBlock, m - c0);
      for (int64_t r = r0; r < r0 + rows; ++r) {
        std::fill(out + r * m + c0, out + r * m + c0 + cols, acc_t(0));
      }
      for (int64_t k0 = 0; k0 < k; k0 += kTileRows) {
        const int64_t depth = std::min(kTileRows, k - k0);
        generate_tile(tile.data(), k0, depth, c0, cols, m, seed, layer, step);
        add_tile_product(e + r0 * k + k0, k, tile.data(), depth, out + r0 * m + c0, m, rows, cols);
      }
      if (derivative != nullptr) {
        for (int64_t r = r0; r < r0 + rows; ++r) {
          for (int64_t j = c0; j < c0 + cols; ++j) {
            out[r * m + j] *= derivative[r * m + j];
          }
        }
      }
    }
  });
}

at::Tensor feedback_project(const at::Tensor& e, int64_t seed, int64_t layer, int64_t out_features,
                            double scale, const std::optional<at::Tensor>& derivative) {
  TORCH_CHECK(e.dim() == 2, "e must be 2-D (batch, K), got shape ", e.sizes());
  TORCH_CHECK(e.scalar_type() == at::kFloat || e.scalar_type() == at::kDouble ||
                  e.scalar_type() == at::kBFloat16 || e.scalar_type() == at::kHalf,
              "e must be float32, float64, bfloat16 or float16, got ", e.scalar_type());
  TORCH_CHECK(seed >= 0 && seed < (int64_t{1} << 32), "seed must be in [0, 2**32), got ", seed);
  TORCH_CHECK(layer >= 0 && layer < (int64_t{1} << 31), "layer must be in [0, 2**31), got ", layer);
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  // The kernels compute in float: a scale past float's range would make B's entries inf.
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)), "scale must be a finite float32, got ", scale);
  const int64_t n = e.size(0), k = e.size(1);
  if (derivative.has_value()) {
    TORCH_CHECK(derivative->device() == e.device(), "derivative must be on ", e.device(), ", got ",
                derivative->device());
    TORCH_CHECK(derivative->scalar_type() == e.scalar_type(), "derivative must have e's dtype (",
                e.scalar_type(), "), got ", derivative->scalar_type());
    TORCH_CHECK(derivative->sizes() == at::IntArrayRef({n, out_features}), "derivative must have shape (",
                n, ", ", out_features, "), got ", derivative->sizes());
  }
  const auto acc_type = e.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor e_acc = e.to(acc_type).contiguous();
  const at::Tensor d_acc = derivative.has_value() ? derivative->to(acc_type).contiguous() : at::Tensor();
  at::Tensor out = at::empty({n, out_features}, e.options().dtype(acc_type));
  const float step = std::ldexp(static_cast<float>(scale), -31);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "feedback_project", [&] {
    project<scalar_t>(e_acc.const_data_ptr<scalar_t>(), n, k, out.mutable_data_ptr<scalar_t>(), out_features,
                      d_acc.defined() ? d_acc.const_data_ptr<scalar_t>() : nullptr, static_cast<uint32_t>(seed),
                      static_cast<uint32_t>(layer), step);
  });
  return out.to(e.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(memkernels, CPU, m) {
  m.impl("feedback_project", &feedback_project);
}

}  // namespace memkernels::cpu::CPU_CAPABILITY
