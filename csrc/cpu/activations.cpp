// CPU kernels of the fused activations: activation_forward/backward and gated_forward/backward
// (schemas in csrc/ops.cpp, semantics in memkernels/reference.py).
//
// One pass over memory each way. Forward reads x once and writes y and what backward keeps:
// f'(x) (bits == 0) or the packed code of x, counted and packed tile by tile with no code tensor in
// between. Backward reads grad_out and the saved tensor once; codes are unpacked a tile at a time
// and looked up in the (at most 256-entry) level table on the stack.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "activations.h"
#include "cpu/packing.h"
#include "cpu/vec_math.h"

namespace memkernels::cpu {
namespace {

// ---- argument checks ----

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
}

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 0 || valid_bits(bits), "bits must be 0 (exact) or one of 1, 2, 3, 4, 8, got ", bits);
}

Activation check_activation(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, "activation must be an id in [0, ",
              kNumActivations, ") (memkernels.activations.spec.Activation), got ", activation);
  return static_cast<Activation>(activation);
}

Activation check_gate(int64_t activation) {
  const Activation act = check_activation(activation);
  TORCH_CHECK(act == Activation::SILU || act == Activation::GELU || act == Activation::GELU_TANH,
              "activation of a gated unit must be SILU, GELU or GELU_TANH, got id ", activation);
  return act;
}

// A float32 table (borders, levels, value_levels) of `size` values, on the device of `like`.
at::Tensor check_table(const std::optional<at::Tensor>& table, const char* name, int64_t size, int64_t bits,
                       const at::Tensor& like) {
  TORCH_CHECK(table.has_value(), name, " must be given when bits > 0 (bits = ", bits, ")");
  TORCH_CHECK(table->scalar_type() == at::kFloat, name, " must be float32, got ", table->scalar_type());
  TORCH_CHECK(table->device() == like.device(), name, " must be on ", like.device(), ", got ", table->device());
  TORCH_CHECK(table->numel() == size, name, " must have 2**bits", size % 2 ? " - 1" : "", " = ", size,
              " values for bits = ", bits, ", got ", table->numel());
  return table->contiguous();
}

// Saved codes: uint8 of packed_nbytes(numel, bits) bytes.
at::Tensor check_codes(const at::Tensor& codes, const char* name, int64_t numel, int64_t bits,
                       const at::Tensor& like) {
  TORCH_CHECK(codes.scalar_type() == at::kByte, name, " must be the uint8 packed code when bits > 0, got ",
              codes.scalar_type());
  TORCH_CHECK(codes.device() == like.device(), name, " must be on ", like.device(), ", got ", codes.device());
  TORCH_CHECK(codes.numel() == packed_nbytes(numel, bits), name, " must hold ceil(numel / 8) * bits = ",
              packed_nbytes(numel, bits), " bytes for ", numel, " elements at bits = ", bits, ", got ",
              codes.numel());
  return codes.contiguous();
}

at::Tensor empty_codes(int64_t numel, int64_t bits, const at::Tensor& like) {
  return at::empty({packed_nbytes(numel, bits)}, like.options().dtype(at::kByte));
}

// ---- forward ----

// y = f(x) and either d = f'(x) (d != nullptr) or the packed code of x (codes, bits, borders).
template <Activation A, typename scalar_t>
void activation_forward_kernel(const scalar_t* x, scalar_t* y, scalar_t* d, uint8_t* codes, int64_t bits,
                               const float* borders, int64_t numel, double p0_, double p1_) {
  using T = opmath_t<scalar_t>;
  using V = Vectorized<T>;
  using M = VecMath<V>;
  const V p0(static_cast<T>(p0_)), p1(static_cast<T>(p1_));
  for_each_tile(numel, [&](int64_t begin, int64_t n) {
    alignas(64) T x_buf[kTile], y_buf[kTile], d_buf[kTile];
    const T* xs = read_tile(x + begin, n, x_buf);
    T* ys = tile_output(y + begin, y_buf);
    if (d != nullptr) {
      T* ds = tile_output(d + begin, d_buf);
      for_each_vec<T>(n, [&](int64_t i, int64_t count) {
        const V xv = load_vec(xs + i, count);
        store_vec(activation_value_of<A, M>(xv, p0, p1), ys + i, count);
        store_vec(activation_derivative_of<A, M>(xv, p0, p1), ds + i, count);
      });
      write_tile(ds, d + begin, n);
    } else {
      for_each_vec<T>(n, [&](int64_t i, int64_t count) {
        store_vec(activation_value_of<A, M>(load_vec(xs + i, count), p0, p1), ys + i, count);
      });
      alignas(64) float f_buf[kTile];
      dispatch_bits(bits, [&](auto k) {
        pack_codes<k.value>(float_tile(xs, n, f_buf), n, borders, codes + begin / 8 * k.value);
      });
    }
    write_tile(ys, y + begin, n);
  });
}

std::tuple<at::Tensor, at::Tensor> activation_forward(const at::Tensor& x_in, int64_t activation, double p0,
                                                      double p1, int64_t bits,
                                                      const std::optional<at::Tensor>& borders_in) {
  check_floating(x_in, "x");
  const Activation act = check_activation(activation);
  check_bits(bits);
  at::Tensor borders;
  if (bits > 0) {
    borders = check_table(borders_in, "borders", (int64_t{1} << bits) - 1, bits, x_in);
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor saved = bits == 0 ? at::empty_like(x, at::MemoryFormat::Contiguous) : empty_codes(x.numel(), bits, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "activation_forward", [&] {
    dispatch_activation(act, [&](auto a) {
      activation_forward_kernel<a.value>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
          bits == 0 ? saved.mutable_data_ptr<scalar_t>() : nullptr,
          bits == 0 ? nullptr : saved.mutable_data_ptr<uint8_t>(), bits,
          bits == 0 ? nullptr : borders.const_data_ptr<float>(), x.numel(), p0, p1);
    });
  });
  return {y, saved};
}

// y = f(a) * b and, with codes != nullptr, the packed code of a.
template <Activation A, typename scalar_t>
void gated_forward_kernel(const scalar_t* a, const scalar_t* b, scalar_t* y, uint8_t* codes, int64_t bits,
                          const float* borders, int64_t numel) {
  using T = opmath_t<scalar_t>;
  using V = Vectorized<T>;
  using M = VecMath<V>;
  const V zero(T(0));
  for_each_tile(numel, [&](int64_t begin, int64_t n) {
    alignas(64) T a_buf[kTile], b_buf[kTile], y_buf[kTile];
    const T* as = read_tile(a + begin, n, a_buf);
    const T* bs = read_tile(b + begin, n, b_buf);
    T* ys = tile_output(y + begin, y_buf);
    for_each_vec<T>(n, [&](int64_t i, int64_t count) {
      const V f = activation_value_of<A, M>(load_vec(as + i, count), zero, zero);
      store_vec(f * load_vec(bs + i, count), ys + i, count);
    });
    write_tile(ys, y + begin, n);
    if (codes != nullptr) {
      alignas(64) float f_buf[kTile];
      dispatch_bits(bits, [&](auto k) {
        pack_codes<k.value>(float_tile(as, n, f_buf), n, borders, codes + begin / 8 * k.value);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gated_forward(const at::Tensor& a_in, const at::Tensor& b_in, int64_t activation,
                                                 int64_t bits, const std::optional<at::Tensor>& borders_in) {
  check_floating(a_in, "a");
  check_like(b_in, "b", a_in, "a");
  const Activation act = check_gate(activation);
  check_bits(bits);
  at::Tensor borders;
  if (bits > 0) {
    borders = check_table(borders_in, "borders", (int64_t{1} << bits) - 1, bits, a_in);
  }
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor y = at::empty_like(a, at::MemoryFormat::Contiguous);
  at::Tensor codes = bits == 0 ? at::empty({0}, a.options().dtype(at::kByte)) : empty_codes(a.numel(), bits, a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "gated_forward", [&] {
    dispatch_activation(act, [&](auto f) {
      gated_forward_kernel<f.value>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                    y.mutable_data_ptr<scalar_t>(),
                                    bits == 0 ? nullptr : codes.mutable_data_ptr<uint8_t>(), bits,
                                    bits == 0 ? nullptr : borders.const_data_ptr<float>(), a.numel());
    });
  });
  return {y, codes};
}

// ---- backward ----

// table[code] for the codes of one tile: unpacks its groups, then looks each code up.
template <typename T>
struct LevelTable {
  alignas(64) T values[256];

  explicit LevelTable(const at::Tensor& levels) {
    const float* src = levels.const_data_ptr<float>();
    for (int64_t i = 0; i < levels.numel(); ++i) {
      values[i] = static_cast<T>(src[i]);
    }
  }
  // out[i] = values[code of element begin + i] for the tile [begin, begin + n).
  void lookup(const uint8_t* packed, int64_t bits, int64_t begin, int64_t n, T* out) const {
    dispatch_bits(bits, [&](auto k) { lookup_codes<k.value>(packed + begin / 8 * k.value, n, values, out); });
  }
};

// grad_in = grad_out * d, d = saved (bits == 0) or levels[code].
template <typename scalar_t>
void activation_backward_kernel(const scalar_t* grad_out, const scalar_t* saved, const uint8_t* codes,
                                int64_t bits, const at::Tensor& levels, scalar_t* grad_in, int64_t numel) {
  using T = opmath_t<scalar_t>;
  const std::optional<LevelTable<T>> table =
      bits == 0 ? std::nullopt : std::make_optional<LevelTable<T>>(levels);
  for_each_tile(numel, [&](int64_t begin, int64_t n) {
    alignas(64) T g_buf[kTile], d_buf[kTile], out_buf[kTile];
    const T* gs = read_tile(grad_out + begin, n, g_buf);
    const T* ds;
    if (table) {
      table->lookup(codes, bits, begin, n, d_buf);
      ds = d_buf;
    } else {
      ds = read_tile(saved + begin, n, d_buf);
    }
    T* outs = tile_output(grad_in + begin, out_buf);
    for_each_vec<T>(n, [&](int64_t i, int64_t count) {
      store_vec(load_vec(gs + i, count) * load_vec(ds + i, count), outs + i, count);
    });
    write_tile(outs, grad_in + begin, n);
  });
}

at::Tensor activation_backward(const at::Tensor& grad_out_in, const at::Tensor& saved_in, int64_t bits,
                               const std::optional<at::Tensor>& levels_in) {
  check_floating(grad_out_in, "grad_out");
  check_bits(bits);
  at::Tensor saved, levels;
  if (bits == 0) {
    check_like(saved_in, "saved", grad_out_in, "grad_out");
    saved = saved_in.contiguous();
  } else {
    saved = check_codes(saved_in, "saved", grad_out_in.numel(), bits, grad_out_in);
    levels = check_table(levels_in, "levels", int64_t{1} << bits, bits, grad_out_in);
  }
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_in = at::empty_like(grad_out, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "activation_backward", [&] {
    activation_backward_kernel<scalar_t>(
        grad_out.const_data_ptr<scalar_t>(), bits == 0 ? saved.const_data_ptr<scalar_t>() : nullptr,
        bits == 0 ? nullptr : saved.const_data_ptr<uint8_t>(), bits, levels, grad_in.mutable_data_ptr<scalar_t>(),
        grad_out.numel());
  });
  return grad_in;
}

// grad_a = g * b * f'(a), grad_b = g * f(a): from a itself (bits == 0) or from levels[code] and
// value_levels[code].
template <Activation A, typename scalar_t>
void gated_backward_kernel(const scalar_t* grad_out, const scalar_t* a, const uint8_t* codes, const scalar_t* b,
                           int64_t bits, const at::Tensor& levels, const at::Tensor& value_levels,
                           scalar_t* grad_a, scalar_t* grad_b, int64_t numel) {
  using T = opmath_t<scalar_t>;
  using V = Vectorized<T>;
  using M = VecMath<V>;
  const bool exact = bits == 0;
  const std::optional<LevelTable<T>> d_table = exact ? std::nullopt : std::make_optional<LevelTable<T>>(levels);
  const std::optional<LevelTable<T>> v_table =
      exact ? std::nullopt : std::make_optional<LevelTable<T>>(value_levels);
  const V zero(T(0));
  for_each_tile(numel, [&](int64_t begin, int64_t n) {
    alignas(64) T g_buf[kTile], b_buf[kTile], ga_buf[kTile], gb_buf[kTile];
    alignas(64) T a_buf[kTile], d_buf[kTile], v_buf[kTile];
    const T* gs = read_tile(grad_out + begin, n, g_buf);
    const T* bs = read_tile(b + begin, n, b_buf);
    T* gas = tile_output(grad_a + begin, ga_buf);
    T* gbs = tile_output(grad_b + begin, gb_buf);
    if (exact) {
      const T* as = read_tile(a + begin, n, a_buf);
      for_each_vec<T>(n, [&](int64_t i, int64_t count) {
        const V av = load_vec(as + i, count), g = load_vec(gs + i, count);
        const V d = activation_derivative_of<A, M>(av, zero, zero);
        store_vec(g * load_vec(bs + i, count) * d, gas + i, count);
        store_vec(g * activation_value_of<A, M>(av, zero, zero), gbs + i, count);
      });
    } else {
      d_table->lookup(codes, bits, begin, n, d_buf);
      v_table->lookup(codes, bits, begin, n, v_buf);
      for_each_vec<T>(n, [&](int64_t i, int64_t count) {
        const V g = load_vec(gs + i, count);
        store_vec(g * load_vec(bs + i, count) * load_vec(d_buf + i, count), gas + i, count);
        store_vec(g * load_vec(v_buf + i, count), gbs + i, count);
      });
    }
    write_tile(gas, grad_a + begin, n);
    write_tile(gbs, grad_b + begin, n);
  });
}

std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& grad_out_in, const at::Tensor& saved_a_in,
                                                  const at::Tensor& b_in, int64_t activation, int64_t bits,
                                                  const std::optional<at::Tensor>& levels_in,
                                                  const std::optional<at::Tensor>& value_levels_in) {
  check_floating(grad_out_in, "grad_out");
  check_like(b_in, "b", grad_out_in, "grad_out");
  const Activation act = check_gate(activation);
  check_bits(bits);
  at::Tensor saved_a, levels, value_levels;
  if (bits == 0) {
    check_like(saved_a_in, "saved_a", grad_out_in, "grad_out");
    saved_a = saved_a_in.contiguous();
  } else {
    saved_a = check_codes(saved_a_in, "saved_a", grad_out_in.numel(), bits, grad_out_in);
    levels = check_table(levels_in, "levels", int64_t{1} << bits, bits, grad_out_in);
    value_levels = check_table(value_levels_in, "value_levels", int64_t{1} << bits, bits, grad_out_in);
  }
  const at::Tensor grad_out = grad_out_in.contiguous(), b = b_in.contiguous();
  at::Tensor grad_a = at::empty_like(grad_out, at::MemoryFormat::Contiguous);
  at::Tensor grad_b = at::empty_like(grad_out, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "gated_backward", [&] {
    dispatch_activation(act, [&](auto f) {
      gated_backward_kernel<f.value>(
          grad_out.const_data_ptr<scalar_t>(), bits == 0 ? saved_a.const_data_ptr<scalar_t>() : nullptr,
          bits == 0 ? nullptr : saved_a.const_data_ptr<uint8_t>(), b.const_data_ptr<scalar_t>(), bits, levels,
          value_levels, grad_a.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>(), grad_out.numel());
    });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(memkernels, CPU, m) {
  m.impl("activation_forward", &activation_forward);
  m.impl("activation_backward", &activation_backward);
  m.impl("gated_forward", &gated_forward);
  m.impl("gated_backward", &gated_backward);
}

}  // namespace memkernels::cpu
