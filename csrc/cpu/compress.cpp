// CPU kernels of the compressed saved inputs (schemas and contract in csrc/ops.cpp, reference in
// memkernels/reference.py): auxiliary_sign_forward, quantize_groups, dequantize_groups and
// weight_grad_from_codes. Every input is 2-D [rows, cols]; each row's codes are packed on their own.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/checks.h"
#include "cpu/packing.h"
#include "cpu/pages.h"
#include "cpu/philox_lanes.h"

// The AVX2 build of packing.h and ATen's vectors (the command line's), as pack_bits.cpp: next to the
// GEMMs of a Linear these loops need only be vectorised, not tuned per instruction set.
namespace memkernels::cpu::CPU_CAPABILITY {
namespace {

// Rows a task takes: about 64K values, enough to amortise the task.
int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
}

void check_code_bits(int64_t bits) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "bits must be one of 1, 2, 4, 8, got ", bits);
}

// Calls f(std::integral_constant<int64_t, bits>{}) for bits in (1, 2, 4, 8): the group codes.
template <typename F>
void dispatch_code_bits(int64_t bits, const F& f) {
  check_code_bits(bits);
  dispatch_bits(bits, f);
}

void check_rows(const at::Tensor& t, const char* name) {
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [rows, cols], got shape ", t.sizes());
}

void check_group_size(int64_t group_size) {
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "group_size must be a positive multiple of 8, got ",
              group_size);
}

int64_t num_groups(int64_t cols, int64_t group_size) {
  return cols == 0 ? 0 : (cols - 1) / group_size + 1;  // not cols + group_size - 1: it may overflow
}

// codes [rows, packed_nbytes(cols, bits)] uint8 and, when given, stats [rows, groups, 2] bfloat16,
// both on the CPU. Returns them contiguous.
std::pair<at::Tensor, at::Tensor> check_codes_and_stats(const at::Tensor& codes,
                                                        const std::optional<at::Tensor>& stats, int64_t cols,
                                                        int64_t bits, int64_t group_size) {
  TORCH_CHECK(cols >= 0, "cols must be >= 0, got ", cols);
  check_code_bits(bits);
  check_group_size(group_size);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == packed_nbytes(cols, bits), "codes must be [rows, ",
              packed_nbytes(cols, bits), "] (ceil(cols / 8) * bits bytes a row for cols = ", cols,
              ", bits = ", bits, "), got shape ", codes.sizes());
  if (!stats.has_value()) {
    return {codes.contiguous(), at::Tensor()};
  }
  TORCH_CHECK(stats->scalar_type() == at::kBFloat16, "stats must be bfloat16, got ", stats->scalar_type());
  TORCH_CHECK(stats->device() == codes.device(), "stats must be on the device of codes (", codes.device(),
              "), got ", stats->device());
  const int64_t groups = num_groups(cols, group_size);
  TORCH_CHECK(stats->dim() == 3 && stats->size(0) == codes.size(0) && stats->size(1) == groups &&
                  stats->size(2) == 2,
              "stats must be [rows, ceil(cols / group_size), 2] = [", codes.size(0), ", ", groups,
              ", 2], got shape ", stats->sizes());
  return {codes.contiguous(), stats->contiguous()};
}

// float32 v rounded to a bfloat16 value toward +inf (up) or -inf: truncating the low 16 bits
// rounds toward zero, so step one bfloat16 ulp away from zero where that went the wrong way.
float round_bfloat16(float v, bool up) {
  uint32_t word;
  std::memcpy(&word, &v, sizeof word);
  word &= 0xFFFF0000u;
  float truncated;
  std::memcpy(&truncated, &word, sizeof word);
  if (up ? truncated < v : truncated > v) {
    word += 0x10000u;
    std::memcpy(&truncated, &word, sizeof word);
  }
  return truncated;
}

// bfloat16's largest finite value, 0x7F7F: float32's largest values lie above it.
const float kBFloat16Max = static_cast<float>(std::numeric_limits<at::BFloat16>::max());

// (a - b) / d, rounded as if float's exponent had no bound where a - b overflows (a and b finite,
// further apart than float's largest value): from the halves then, a * 0.5 - b * 0.5 (exact
// halvings, one rounding), divided, doubled (exact). memkernels/reference.py scaled_difference.
float scaled_difference(float a, float b, float d) {
  const float diff = a - b;
  return std::isinf(diff) ? (a * 0.5f - b * 0.5f) / d * 2.0f : diff / d;
}

// low + scale * code with one rounding (scale * code, a bfloat16 times a code of at most 8 bits, is
// exact), saturated at +-bound (NaN stays NaN): the top code of a group reaching its dtype's
// largest values stands for a value up to a scale above them. A group whose scale * top overflows
// is computed from halves (exact) and doubled: half = 0.5, twice = 2 there, 1 and 1 elsewhere.
float dequantized(float low, float scale, float code, float half, float twice, float bound) {
  return std::clamp((low * half + scale * half * code) * twice, -bound, bound);
}

// The largest finite value of `dtype` that a float holds: dequantized values saturate there.
float saturation_bound(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return static_cast<float>(std::numeric_limits<at::Half>::max());
    case at::kBFloat16: return kBFloat16Max;
    default: return std::numeric_limits<float>::max();
  }
}

// ---- auxiliary_sign_forward ----

using FloatVec = at::vec::Vectorized<float>;
static_assert(FloatVec::size() == 8, "the AVX2 build: 8 floats a vector");

// The 16 values at x (float32, bfloat16 or float16) as two vectors of float.
template <typename T>
std::tuple<FloatVec, FloatVec> load_floats16(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return {FloatVec::loadu(x), FloatVec::loadu(x + 8)};
  } else {
    return at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(x));
  }
}

// x_aux and the two sign bytes of the 16 values at x, in float as the scalar loop below.
template <typename T>
void auxiliary_sign_16(const T* x, float up, float down, T* x_aux, uint8_t* signs) {
  using V = FloatVec;
  const auto [lo, hi] = load_floats16(x);
  const V positive_lo = lo > V(0.0f), positive_hi = hi > V(0.0f);  // NaN: not positive
  const V aux_lo = lo + V::blendv(V(down), V(up), positive_lo);
  const V aux_hi = hi + V::blendv(V(down), V(up), positive_hi);
  if constexpr (std::is_same_v<T, float>) {
    aux_lo.store(x_aux);
    aux_hi.store(x_aux + 8);
  } else {
    at::vec::convert_from_float<T>(aux_lo, aux_hi).store(x_aux);
  }
  const auto bits = static_cast<uint16_t>(_mm256_movemask_ps(positive_lo) | _mm256_movemask_ps(positive_hi) << 8);
  std::memcpy(signs, &bits, sizeof bits);
}

template <typename T>
void auxiliary_sign_rows(const T* x, int64_t rows, int64_t cols, double eps, bool nonnegative, T* x_aux,
                         uint8_t* signs) {
  using acc_t = at::opmath_type<T>;
  const int64_t row_bytes = packed_nbytes(cols, 1);
  const acc_t up = static_cast<acc_t>(eps), down = nonnegative ? acc_t(0) : -up;  // eps * s(x)
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    populate_fresh_pages(x_aux + begin * cols, (end - begin) * cols * static_cast<int64_t>(sizeof(T)));
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * cols;
      T* ar = x_aux + r * cols;
      int64_t vectorised = 0;  // columns done 16 at a time; float64 computes in double, below
      if constexpr (std::is_same_v<acc_t, float>) {
        for (; vectorised + 16 <= cols; vectorised += 16) {
          auxiliary_sign_16(xr + vectorised, up, down, ar + vectorised, signs + r * row_bytes + vectorised / 8);
        }
      }
      for (int64_t byte = vectorised / 8; byte < row_bytes; ++byte) {
        const int64_t c0 = byte * 8, n = std::min<int64_t>(8, cols - c0);
        uint8_t packed = 0;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t v = static_cast<acc_t>(xr[c0 + j]);
          const bool positive = v > 0;
          packed |= static_cast<uint8_t>(positive) << j;
          ar[c0 + j] = static_cast<T>(v + (positive ? up : down));
        }
        signs[r * row_bytes + byte] = packed;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> auxiliary_sign_forward(const at::Tensor& x_in, double eps, bool nonnegative) {
  check_rows(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor x_aux = at::empty_like(x);
  at::Tensor signs = at::empty({rows, packed_nbytes(cols, 1)}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "auxiliary_sign_forward", [&] {
    auxiliary_sign_rows<scalar_t>(x.const_data_ptr<scalar_t>(), rows, cols, eps, nonnegative,
                                  x_aux.mutable_data_ptr<scalar_t>(), signs.mutable_data_ptr<uint8_t>());
  });
  return {x_aux, signs};
}

// ---- quantize_groups ----

// q[0, 8) = the codes floor((x - mn) / scale + noise) of 8 values, clamped to [0, 2**kBits - 1],
// NaN to 0: the scalar loop of quantize_row, op for op in float.
template <int64_t kBits>
void store_levels(const FloatVec& x, float mn, float scale, const float* noise, uint8_t* q) {
  const FloatVec diff = x - FloatVec(mn);
  FloatVec scaled = diff / FloatVec(scale);
  const FloatVec over = diff.abs() == FloatVec(std::numeric_limits<float>::infinity());
  if (_mm256_movemask_ps(over) != 0) {  // as scaled_difference, for the lanes where x - mn overflows
    const FloatVec half(0.5f);
    scaled = FloatVec::blendv(scaled, (x * half - FloatVec(mn) * half) / FloatVec(scale) * FloatVec(2.0f), over);
  }
  const FloatVec level = (scaled + FloatVec::loadu(noise)).floor();
  const __m256 no_nan = _mm256_andnot_ps(level.isnan(), level);  // NaN lanes are all ones: 0
  const __m256 clamped = _mm256_max_ps(_mm256_min_ps(no_nan, _mm256_set1_ps((1 << kBits) - 1)), _mm256_setzero_ps());
  const __m256i ints = _mm256_cvttps_epi32(clamped);
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(ints), _mm256_extracti128_si256(ints, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packus_epi16(words, words));
}

// Codes and (min, scale) of every group of row `row` (cols values at x).
template <int64_t kBits, typename T>
void quantize_row(const T* x, int64_t row, int64_t cols, int64_t group_size, uint64_t seed, uint8_t* codes,
                  at::BFloat16* stats, uint8_t* q) {
  constexpr float kTop = static_cast<float>((1 << kBits) - 1);
  constexpr float kNoiseScale = 1.0f / (1 << 24);
  for (int64_t c0 = 0, g = 0; c0 < cols; c0 += group_size, ++g) {
    const int64_t n = std::min(group_size, cols - c0);
    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
    bool finite = true;
    int64_t scanned = 0;
    if constexpr (!std::is_same_v<T, double>) {
      // v - v is 0 for a finite v and NaN otherwise; while all are finite, min and max are exact.
      FloatVec lows(lo), highs(hi), not_finite(0.0f);
      for (; scanned + 16 <= n; scanned += 16) {
        const auto [first, second] = load_floats16(x + c0 + scanned);
        for (const FloatVec& v : {first, second}) {
          lows = FloatVec(_mm256_min_ps(lows, v));
          highs = FloatVec(_mm256_max_ps(highs, v));
          not_finite = not_finite + (v - v);
        }
      }
      alignas(32) float lane_lo[8], lane_hi[8], lane_bad[8];
      lows.store(lane_lo);
      highs.store(lane_hi);
      not_finite.store(lane_bad);
      for (int k = 0; k < 8; ++k) {
        lo = std::min(lo, lane_lo[k]);
        hi = std::max(hi, lane_hi[k]);
        finite &= lane_bad[k] == 0.0f;
      }
    }
    for (int64_t j = scanned; j < n; ++j) {
      const float v = static_cast<float>(x[c0 + j]);
      finite &= std::isfinite(v);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    float mn = std::numeric_limits<float>::quiet_NaN(), scale = mn;
    if (finite) {
      // Groups near float's range stay finite, as in memkernels/reference.py group_stats.
      mn = std::max(round_bfloat16(lo, /*up=*/false), -kBFloat16Max);
      scale = std::min(round_bfloat16(scaled_difference(hi, mn, kTop), /*up=*/true), kBFloat16Max);
    }
    stats[2 * g] = mn;  // exact: both are bfloat16 values
    stats[2 * g + 1] = scale;
    // Value (row, c) takes output c % 4 of Philox at counter (c / 4, 0, row, 0) under key seed, as
    // at::Philox4_32(seed, row, c / 4) draws it; c0 % 8 == 0. 32 values at a time from 8 counters.
    int64_t j = 0;
    if constexpr (!std::is_same_v<T, double>) {
      for (; j + 32 <= n; j += 32) {
        uint32_t words[4][kPhiloxLanes];
        philox_lanes(static_cast<uint64_t>((c0 + j) / 4), static_cast<uint32_t>(row),
                     static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32), static_cast<uint32_t>(seed),
                     static_cast<uint32_t>(seed >> 32), words);
        alignas(32) float noise[4 * kPhiloxLanes];
        for (int64_t lane = 0; lane < kPhiloxLanes; ++lane) {
          for (int w = 0; w < 4; ++w) {
            noise[4 * lane + w] = static_cast<float>(words[w][lane] >> 8) * kNoiseScale;
          }
        }
        for (int64_t k = 0; k < 32; k += 16) {
          const auto [lo, hi] = load_floats16(x + c0 + j + k);
          store_levels<kBits>(lo, mn, scale, noise + k, q + j + k);
          store_levels<kBits>(hi, mn, scale, noise + k + 8, q + j + k + 8);
        }
      }
    }
    at::Philox4_32 philox(seed, static_cast<uint64_t>(row), static_cast<uint64_t>((c0 + j) / 4));
    for (; j < n; ++j) {
      const float u = static_cast<float>(philox() >> 8) * kNoiseScale;
      const float level = std::floor(scaled_difference(static_cast<float>(x[c0 + j]), mn, scale) + u);
      q[j] = std::isnan(level) ? 0 : static_cast<uint8_t>(std::clamp(level, 0.0f, kTop));
    }
    const int64_t whole = (n + 7) / 8;
    std::fill(q + n, q + whole * 8, 0);
    pack_groups<kBits>(q, whole, codes + c0 / 8 * kBits);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_groups(const at::Tensor& x_in, int64_t bits, int64_t group_size,
                                                   const at::Tensor& seed) {
  check_rows(x_in, "x");
  check_code_bits(bits);  // before the outputs are sized by it
  check_group_size(group_size);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device().is_cpu(),
              "seed must be an int64 scalar tensor on the CPU, got ", seed.scalar_type(), " of shape ",
              seed.sizes(), " on ", seed.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto key = static_cast<uint64_t>(seed.item<int64_t>());
  at::Tensor codes = at::empty({rows, packed_nbytes(cols, bits)}, x.options().dtype(at::kByte));
  at::Tensor stats = at::empty({rows, num_groups(cols, group_size), 2}, x.options().dtype(at::kBFloat16));
  dispatch_code_bits(bits, [&](auto k) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_groups", [&] {
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      uint8_t* cs = codes.mutable_data_ptr<uint8_t>();
      at::BFloat16* ss = stats.mutable_data_ptr<at::BFloat16>();
      const int64_t row_bytes = codes.size(1), row_stats = stats.size(1) * 2;
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
        // A group's codes before packing: no group is longer than a row.
        std::vector<uint8_t> q((std::min(group_size, cols) + 7) / 8 * 8);
        for (int64_t r = begin; r < end; ++r) {
          quantize_row<k.value>(xs + r * cols, r, cols, group_size, key, cs + r * row_bytes, ss + r * row_stats,
                                q.data());
        }
      });
    });
  });
  return {codes, stats};
}

// ---- dequantize_groups, weight_grad_from_codes ----

// out[c] = min + scale * code (from stats, or lo and step when stats is null; dequantized) for the
// cols codes of one row.
template <int64_t kBits, typename out_t>
void dequantize_row(const uint8_t* codes, const at::BFloat16* stats, int64_t cols, int64_t group_size, float lo,
                    float step, float bound, out_t* out) {
  uint8_t q[8];
  for (int64_t c0 = 0; c0 < cols; c0 += 8) {
    const int64_t g = c0 / group_size;
    const float mn = stats ? static_cast<float>(stats[2 * g]) : lo;
    const float scale = stats ? static_cast<float>(stats[2 * g + 1]) : step;
    const bool over = std::isinf(scale * ((1 << kBits) - 1));
    unpack_groups<kBits>(codes + c0 / 8 * kBits, 1, q);
    for (int64_t j = 0; j < std::min<int64_t>(8, cols - c0); ++j) {
      out[c0 + j] = static_cast<out_t>(
          dequantized(mn, scale, static_cast<float>(q[j]), over ? 0.5f : 1.0f, over ? 2.0f : 1.0f, bound));
    }
  }
}

// Rows [begin, end) of the coded tensor dequantized into out [end - begin, cols], saturated at the
// range of `dtype` (out's own, or the dtype its values stand in for).
template <typename out_t>
void dequantize_rows(const at::Tensor& codes, const at::Tensor& stats, int64_t begin, int64_t end, int64_t cols,
                     int64_t bits, int64_t group_size, double lo, double step, at::ScalarType dtype, out_t* out) {
  const float bound = saturation_bound(dtype);
  const uint8_t* cs = codes.const_data_ptr<uint8_t>();
  const at::BFloat16* ss = stats.defined() ? stats.const_data_ptr<at::BFloat16>() : nullptr;
  const int64_t row_bytes = codes.size(1), row_stats = num_groups(cols, group_size) * 2;
  dispatch_code_bits(bits, [&](auto k) {
    at::parallel_for(begin, end, row_grain(cols), [&](int64_t first, int64_t last) {
      populate_fresh_pages(out + (first - begin) * cols, (last - first) * cols * static_cast<int64_t>(sizeof(out_t)));
      for (int64_t r = first; r < last; ++r) {
        dequantize_row<k.value>(cs + r * row_bytes, ss ? ss + r * row_stats : nullptr, cols, group_size,
                                static_cast<float>(lo), static_cast<float>(step), bound, out + (r - begin) * cols);
      }
    });
  });
}

at::Tensor dequantize_groups(const at::Tensor& codes_in, const std::optional<at::Tensor>& stats_in, int64_t cols,
                             int64_t bits, int64_t group_size, double lo, double step, at::ScalarType dtype) {
  const auto [codes, stats] = check_codes_and_stats(codes_in, stats_in, cols, bits, group_size);
  at::Tensor out = at::empty({codes.size(0), cols}, codes.options().dtype(dtype));
  check_floating(out, "dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dequantize_groups", [&] {
    dequantize_rows<scalar_t>(codes, stats, 0, codes.size(0), cols, bits, group_size, lo, step, dtype,
                              out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor weight_grad_from_codes(const at::Tensor& grad_out, const at::Tensor& codes_in,
                                  const std::optional<at::Tensor>& stats_in, int64_t cols, int64_t bits,
                                  int64_t group_size, double lo, double step) {
  check_rows(grad_out, "grad_out");
  const auto [codes, stats] = check_codes_and_stats(codes_in, stats_in, cols, bits, group_size);
  TORCH_CHECK(codes.device() == grad_out.device(), "codes must be on the device of grad_out (",
              grad_out.device(), "), got ", codes.device());
  const int64_t rows = grad_out.size(0);
  TORCH_CHECK(codes.size(0) == rows, "codes must have a row for each of the ", rows, " rows of grad_out, got ",
              codes.size(0));
  // Blocks of rows dequantized into one buffer and accumulated by the BLAS: x_hat never exists whole.
  constexpr int64_t kBlockRows = 256;
  const at::ScalarType acc_type = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_weight = at::zeros({grad_out.size(1), cols}, grad_out.options().dtype(acc_type));
  at::Tensor x_hat = at::empty({std::min(kBlockRows, rows), cols}, grad_weight.options());
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t n = std::min(kBlockRows, rows - r0);
    AT_DISPATCH_FLOATING_TYPES(acc_type, "weight_grad_from_codes", [&] {
      dequantize_rows<scalar_t>(codes, stats, r0, r0 + n, cols, bits, group_size, lo, step,
                                grad_out.scalar_type(), x_hat.mutable_data_ptr<scalar_t>());
    });
    grad_weight.addmm_(grad_out.narrow(0, r0, n).t().to(acc_type), x_hat.narrow(0, 0, n));
  }
  return grad_weight.to(grad_out.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(memkernels, CPU, m) {
  m.impl("auxiliary_sign_forward", &auxiliary_sign_forward);
  m.impl("quantize_groups", &quantize_groups);
  m.impl("dequantize_groups", &dequantize_groups);
  m.impl("weight_grad_from_codes", &weight_grad_from_codes);
}

}  // namespace memkernels::cpu::CPU_CAPABILITY
