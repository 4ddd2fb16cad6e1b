// The kernels of activation_kernels.h for the instruction set CPU_CAPABILITY (AVX2 or AVX512):
// included once by activation_kernels_avx2.cpp and once by activation_kernels_avx512.cpp.
//
// One pass over memory each way. Forward reads x once and writes y and what backward keeps:
// f'(x) (bits == 0) or the packed code of x, counted and packed tile by tile with no code tensor in
// between. Backward reads grad_out and the saved tensor once (or x, f' then computed from it; a
// grad_out that is one value broadcast, the gradient of y.sum(), through a tile of it: GradTiles);
// codes are looked up a vector at a time as grad_out is multiplied (CodedLevels), in registers for
// float vectors.
#pragma once
#include <ATen/Dispatch.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>

#include "activations.h"
#include "cpu/activation_kernels.h"
#include "cpu/packing.h"
#include "cpu/vec_math.h"

namespace memkernels::cpu::CPU_CAPABILITY {
namespace {

// ---- forward ----

// fn(i, count, xv) for the vectors xv of the tile's n elements at xs (in the compute type T),
// packing activation A's codes into the tile's codes on the way. On AVX512 with float vectors and
// up to 4 bits the codes are packed from the vector in registers; otherwise the code inputs go
// through a float buffer to pack_codes after the loop.
template <typename T, Activation A, typename scalar_t, typename F>
__attribute__((always_inline)) inline void for_each_vec_packing_codes(const scalar_t* xs, int64_t n, int64_t bits,
                                                                      const BorderTree& tree, uint8_t* codes,
                                                                      const F& fn) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (bits <= 4) {
      dispatch_bits(bits, [&](auto k) {
        if constexpr (k.value <= 4) {
          const BroadcastTree<k.value> borders(tree);
          for_each_vec<T>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) {
            const Vectorized<T> xv = load_vec<T>(xs + i, count);
            fn(i, count, xv);
            pack_vector_codes(borders, code_input_of<A>(xv), count, codes + i / 8 * k.value, i + count < n);
          });
        }
      });
      return;
    }
  }
#endif
  alignas(64) float f_buf[kTile];  // the code inputs as float (borders are float32)
  for_each_vec<T>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) {
    const Vectorized<T> xv = load_vec<T>(xs + i, count);
    fn(i, count, xv);
    if constexpr (kConvertsToFloat<scalar_t>) {
      code_input_of<A>(xv).store(f_buf + i);
    }
  });
  const float* xf = f_buf;
  if constexpr (!kConvertsToFloat<scalar_t>) {
    xf = code_input_tile<A>(xs, n, f_buf);
  }
  dispatch_bits(bits, [&](auto k) { pack_codes<k.value>(xf, n, tree, codes); });
}

// y = f(x) and either d = f'(x) (d != nullptr), the packed code of x (codes, bits, borders), or
// nothing else (both nullptr: the forward of a call that no gradient can need).
template <Activation A, typename scalar_t>
void activation_forward_kernel(const scalar_t* x, scalar_t* y, scalar_t* d, uint8_t* codes, int64_t bits,
                               const float* borders, int64_t numel, double p0_, double p1_) {
  using T = opmath_t<scalar_t>;
  using V = Vectorized<T>;
  using M = MathFor<scalar_t>;
  const V p0(static_cast<T>(p0_)), p1(static_cast<T>(p1_));
  const std::optional<BorderTree> tree =
      codes != nullptr ? std::make_optional<BorderTree>(borders, bits) : std::nullopt;
  const bool stream_y = stream_stores(y, numel), stream_d = stream_stores(d, numel);
  for_each_tile(numel, {y, d, {codes, bits}}, [&](int64_t begin, int64_t n) __attribute__((always_inline)) {
    const scalar_t* xs = x + begin;
    scalar_t* ys = y + begin;
    if (d != nullptr) {
      scalar_t* ds = d + begin;
      for_each_vec<T>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) {
        // f and f' both before either store: a store in between keeps GCC from computing what
        // they share (an exp, a division) once.
        const V xv = load_vec<T>(xs + i, count);
        const V yv = activation_value_of<A, M>(xv, p0, p1);
        const V dv = activation_derivative_of<A, M>(xv, p0, p1);
        store_vec(yv, ys + i, count, stream_y);
        store_vec(dv, ds + i, count, stream_d);
      });
    } else if (codes != nullptr) {
      for_each_vec_packing_codes<T, A>(xs, n, bits, *tree, codes + begin / 8 * bits,
                                    [&](int64_t i, int64_t count, const V& xv) __attribute__((always_inline)) {
                                      store_vec(activation_value_of<A, M>(xv, p0, p1), ys + i, count, stream_y);
                                    });
    } else {
      for_each_vec<T>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) {
        store_vec(activation_value_of<A, M>(load_vec<T>(xs + i, count), p0, p1), ys + i, count, stream_y);
      });
    }
  });
}

void activation_forward(Activation act, const at::Tensor& x, double p0, double p1, int64_t bits,
                        const at::Tensor& borders, const at::Tensor& y, const at::Tensor& saved) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "activation_forward", [&] {
    dispatch_activation(act, [&](auto a) {
      activation_forward_kernel<a.value>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
          bits == 0 && saved.defined() ? saved.mutable_data_ptr<scalar_t>() : nullptr,
          bits == 0 ? nullptr : saved.mutable_data_ptr<uint8_t>(), bits,
          bits == 0 ? nullptr : borders.const_data_ptr<float>(), x.numel(), p0, p1);
    });
  });
}

// y = f(a) * b and, with codes != nullptr, the packed code of a.
template <Activation A, typename scalar_t>
void gated_forward_kernel(const scalar_t* a, const scalar_t* b, scalar_t* y, uint8_t* codes, int64_t bits,
                          const float* borders, int64_t numel) {
  using T = opmath_t<scalar_t>;
  using V = Vectorized<T>;
  using M = MathFor<scalar_t>;
  const V zero(T(0));
  const std::optional<BorderTree> tree =
      codes != nullptr ? std::make_optional<BorderTree>(borders, bits) : std::nullopt;
  const bool stream_y = stream_stores(y, numel);
  for_each_tile(numel, {y, {codes, bits}}, [&](int64_t begin, int64_t n) __attribute__((always_inline)) {
    const scalar_t* as = a + begin;
    const scalar_t* bs = b + begin;
    scalar_t* ys = y + begin;
    const auto value = [&](int64_t i, int64_t count, const V& av) {
      store_vec(activation_value_of<A, M>(av, zero, zero) * load_vec<T>(bs + i, count), ys + i, count, stream_y);
    };
    if (codes != nullptr) {
      for_each_vec_packing_codes<T, A>(as, n, bits, *tree, codes + begin / 8 * bits, value);
    } else {
      for_each_vec<T>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) { value(i, count, load_vec<T>(as + i, count)); });
    }
  });
}

void gated_forward(Activation act, const at::Tensor& a, const at::Tensor& b, int64_t bits, const at::Tensor& borders,
                   const at::Tensor& y, const at::Tensor& codes) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "gated_forward", [&] {
    dispatch_activation(act, [&](auto f) {
      gated_forward_kernel<f.value>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                    y.mutable_data_ptr<scalar_t>(),
                                    bits == 0 ? nullptr : codes.mutable_data_ptr<uint8_t>(), bits,
                                    bits == 0 ? nullptr : borders.const_data_ptr<float>(), a.numel());
    });
  });
}

// ---- backward ----

// The incoming gradient of a backward kernel, a tile at a time: grad_out's own elements, or, where
// grad_out is one value broadcast to every element (the gradient of y.sum(), an expanded scalar,
// which activations.cpp passes on uncopied), a tile's worth of that value, which every tile reads.
// Either way the kernel loads and multiplies as it always does: the same arithmetic, bit for bit,
// for kTile elements of memory instead of a full-size copy.
template <typename scalar_t>
struct GradTiles {
  const scalar_t* grad_out;
  bool broadcast;
  alignas(64) scalar_t repeated[kTile];

  GradTiles(const scalar_t* grad_out_, bool broadcast_) : grad_out(grad_out_), broadcast(broadcast_) {
    if (broadcast) {
      std::fill_n(repeated, kTile, grad_out[0]);
    }
  }
  // The gradient of the tile of elements [begin, begin + kTile).
  const scalar_t* tile(int64_t begin) const { return broadcast ? repeated : grad_out + begin; }
};

// A levels tensor (float32) in the compute type T, for CodedLevels.
template <typename T>
struct LevelTable {
  alignas(64) T values[256] = {};  // 2**bits levels, bits <= 8

  explicit LevelTable(const at::Tensor& levels) {
    const float* src = levels.const_data_ptr<float>();
    for (int64_t i = 0; i < levels.numel(); ++i) {
      values[i] = static_cast<T>(src[i]);
    }
  }
};

// table[code] for coded elements, a vector at a time: codes(tile_codes, i, count) reads the codes of
// the vector [i, i + count) of a tile whose codes start at tile_codes, lookup() gives their levels
// (one codes() serves several tables). Float vectors look codes up in registers (VectorLevels);
// double ones unpack the vector's group and index the table.
template <typename T, int64_t kBits>
struct CodedLevels;

template <int64_t kBits>
struct CodedLevels<float, kBits> {
  explicit CodedLevels(const float* table) : levels(table) {}
  auto codes(const uint8_t* tile_codes, int64_t i, int64_t count, bool followed) const {
    return VectorLevels<kBits>::codes(tile_codes + i / 8 * kBits, count, followed);
  }
  template <typename Codes>
  Vectorized<float> lookup(const Codes& codes) const {
    return levels.lookup(codes);
  }
  VectorLevels<kBits> levels;
};

template <int64_t kBits>
struct CodedLevels<double, kBits> {
  using V = Vectorized<double>;
  explicit CodedLevels(const double* table_) : table(table_) {}
  // The codes of the vector (at most one group, from its first code on) as one word.
  uint64_t codes(const uint8_t* tile_codes, int64_t i, int64_t count, bool /*followed*/) const {
    return load_bytes<kBits>(tile_codes + i / 8 * kBits) >> (i % 8 * kBits);
  }
  V lookup(uint64_t codes) const {
    constexpr uint64_t mask = (uint64_t{1} << kBits) - 1;
    alignas(64) double out[V::size()];
    for (int64_t k = 0; k < V::size(); ++k) {  // lanes past the vector's count read code 0
      out[k] = table[(codes >> (k * kBits)) & mask];
    }
    return V::loadu(out);
  }
  const double* table;
};

// grad_in = grad_out * d, d = saved (bits == 0) or levels[code]; a zero level gives 0 whatever
// grad_out holds (inf, NaN), as torch's ReLU backward does where the derivative is 0.
template <typename scalar_t>
void activation_backward_kernel(const GradTiles<scalar_t>& grad, const scalar_t* saved, const uint8_t* codes,
                                int64_t bits, const at::Tensor& levels, scalar_t* grad_in, int64_t numel) {
  using T = opmath_t<scalar_t>;
  using V = Vectorized<T>;
  const bool stream = stream_stores(grad_in, numel);
  // d(begin, i, count): f'(x) of the vector [i, i + count) of the tile at begin.
  const auto multiply = [&](const auto& d, auto zero_level_is_zero) {
    for_each_tile(numel, {grad_in}, [&](int64_t begin, int64_t n) __attribute__((always_inline)) {
      const scalar_t* gs = grad.tile(begin);
      scalar_t* outs = grad_in + begin;
      for_each_vec<T>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) {
        const V dv = d(begin, i, count);
        V product = load_vec<T>(gs + i, count) * dv;
        if constexpr (decltype(zero_level_is_zero)::value) {
          product = VecMathBase<V>::where(VecMathBase<V>::eq(dv, V(T(0))), V(T(0)), product);
        }
        store_vec(product, outs + i, count, stream);
      });
    });
  };
  if (bits == 0) {
    multiply([&](int64_t begin, int64_t i, int64_t count) __attribute__((always_inline)) { return load_vec<T>(saved + begin + i, count); },
             std::false_type{});
    return;
  }
  const LevelTable<T> table(levels);
  dispatch_bits(bits, [&](auto k) {
    const CodedLevels<T, k.value> d(table.values);
    multiply([&](int64_t begin, int64_t i, int64_t count) __attribute__((always_inline)) {
      return d.lookup(d.codes(codes + begin / 8 * k.value, i, count, begin + i + count < numel));
    }, std::true_type{});
  });
}

void activation_backward(const at::Tensor& grad_out, bool grad_broadcast, const at::Tensor& saved, int64_t bits,
                         const at::Tensor& levels, const at::Tensor& grad_in) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "activation_backward", [&] {
    const GradTiles<scalar_t> grad(grad_out.const_data_ptr<scalar_t>(), grad_broadcast);
    activation_backward_kernel<scalar_t>(grad, bits == 0 ? saved.const_data_ptr<scalar_t>() : nullptr,
                                         bits == 0 ? nullptr : saved.const_data_ptr<uint8_t>(), bits, levels,
                                         grad_in.mutable_data_ptr<scalar_t>(), grad_out.numel());
  });
}

// grad_in = grad_out * f'(x), f' computed from x as forward computes it.
template <Activation A, typename scalar_t>
void activation_backward_from_input_kernel(const GradTiles<scalar_t>& grad, const scalar_t* x, scalar_t* grad_in,
                                           int64_t numel, double p0_, double p1_) {
  using T = opmath_t<scalar_t>;
  using V = Vectorized<T>;
  using M = MathFor<scalar_t>;
  const V p0(static_cast<T>(p0_)), p1(static_cast<T>(p1_));
  const bool stream = stream_stores(grad_in, numel);
  for_each_tile(numel, {grad_in}, [&](int64_t begin, int64_t n) __attribute__((always_inline)) {
    const scalar_t* gs = grad.tile(begin);
    const scalar_t* xs = x + begin;
    scalar_t* outs = grad_in + begin;
    for_each_vec<T>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) {
      const V d = activation_derivative_of<A, M>(load_vec<T>(xs + i, count), p0, p1);
      store_vec(load_vec<T>(gs + i, count) * d, outs + i, count, stream);
    });
  });
}

void activation_backward_from_input(Activation act, const at::Tensor& grad_out, bool grad_broadcast,
                                    const at::Tensor& x, double p0, double p1, const at::Tensor& grad_in) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "activation_backward_from_input", [&] {
    const GradTiles<scalar_t> grad(grad_out.const_data_ptr<scalar_t>(), grad_broadcast);
    dispatch_activation(act, [&](auto a) {
      activation_backward_from_input_kernel<a.value>(grad, x.const_data_ptr<scalar_t>(),
                                                     grad_in.mutable_data_ptr<scalar_t>(), x.numel(), p0, p1);
    });
  });
}

// grad_a = g * b * f'(a), grad_b = g * f(a): from a itself (bits == 0) or from levels[code] and
// value_levels[code].
template <Activation A, typename scalar_t>
void gated_backward_kernel(const GradTiles<scalar_t>& grad, const scalar_t* a, const uint8_t* codes, const scalar_t* b,
                           int64_t bits, const at::Tensor& levels, const at::Tensor& value_levels,
                           scalar_t* grad_a, scalar_t* grad_b, int64_t numel) {
  using T = opmath_t<scalar_t>;
  using V = Vectorized<T>;
  using M = MathFor<scalar_t>;
  const bool stream_a = stream_stores(grad_a, numel), stream_b = stream_stores(grad_b, numel);
  // d_and_f(begin, i, count): f'(a) and f(a) of the vector [i, i + count) of the tile at begin.
  const auto for_each_vector = [&](const auto& d_and_f) {
    for_each_tile(numel, {grad_a, grad_b}, [&](int64_t begin, int64_t n) __attribute__((always_inline)) {
      const scalar_t* gs = grad.tile(begin);
      const scalar_t* bs = b + begin;
      scalar_t* gas = grad_a + begin;
      scalar_t* gbs = grad_b + begin;
      for_each_vec<T>(n, [&](int64_t i, int64_t count) __attribute__((always_inline)) {
        const auto [d, f] = d_and_f(begin, i, count);
        const V g = load_vec<T>(gs + i, count);
        store_vec(g * load_vec<T>(bs + i, count) * d, gas + i, count, stream_a);
        store_vec(g * f, gbs + i, count, stream_b);
      });
    });
  };
  if (bits == 0) {
    const V zero(T(0));
    for_each_vector([&](int64_t begin, int64_t i, int64_t count) __attribute__((always_inline)) {
      const V av = load_vec<T>(a + begin + i, count);
      // f' and f both before the stores, as in forward.
      return std::pair{activation_derivative_of<A, M>(av, zero, zero), activation_value_of<A, M>(av, zero, zero)};
    });
    return;
  }
  const LevelTable<T> d_table(levels), f_table(value_levels);
  dispatch_bits(bits, [&](auto k) {
    const CodedLevels<T, k.value> d_levels(d_table.values), f_levels(f_table.values);
    for_each_vector([&](int64_t begin, int64_t i, int64_t count) __attribute__((always_inline)) {
      const auto tile_codes = d_levels.codes(codes + begin / 8 * k.value, i, count, begin + i + count < numel);
      return std::pair{d_levels.lookup(tile_codes), f_levels.lookup(tile_codes)};
    });
  });
}

void gated_backward(Activation act, const at::Tensor& grad_out, bool grad_broadcast, const at::Tensor& saved_a,
                    const at::Tensor& b, int64_t bits, const at::Tensor& levels, const at::Tensor& value_levels,
                    const at::Tensor& grad_a, const at::Tensor& grad_b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "gated_backward", [&] {
    const GradTiles<scalar_t> grad(grad_out.const_data_ptr<scalar_t>(), grad_broadcast);
    dispatch_activation(act, [&](auto f) {
      gated_backward_kernel<f.value>(
          grad, bits == 0 ? saved_a.const_data_ptr<scalar_t>() : nullptr,
          bits == 0 ? nullptr : saved_a.const_data_ptr<uint8_t>(), b.const_data_ptr<scalar_t>(), bits, levels,
          value_levels, grad_a.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>(), grad_out.numel());
    });
  });
}

}  // namespace

extern const ActivationKernels kActivationKernels{activation_forward, activation_backward,
                                                  activation_backward_from_input, gated_forward, gated_backward};

}  // namespace memkernels::cpu::CPU_CAPABILITY
