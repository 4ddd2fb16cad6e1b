// CPU kernels of pack_bits / unpack_bits: k-bit codes in the layout of memkernels/reference.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "activations.h"
#include "cpu/packing.h"
#include "cpu/vec_math.h"

// The AVX2 build of packing.h (the command line's), enough for these memory-bound loops.
namespace memkernels::cpu::CPU_CAPABILITY {
namespace {

void check_pack_bits(int64_t bits) {
  TORCH_CHECK(valid_bits(bits), "bits must be one of 1, 2, 3, 4, 8, got ", bits);
}

at::Tensor pack_bits(const at::Tensor& codes_in, int64_t bits) {
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "codes must be uint8, got ", codes_in.scalar_type());
  check_pack_bits(bits);
  const at::Tensor codes = codes_in.contiguous();
  const int64_t numel = codes.numel();
  at::Tensor packed = at::empty({packed_nbytes(numel, bits)}, codes.options());
  const uint8_t* src = codes.const_data_ptr<uint8_t>();
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
  dispatch_bits(bits, [&](auto k) {
    for_each_tile(numel, {{dst, k.value}}, [&](int64_t begin, int64_t n) {
      // Whole groups straight from the input; the last, partial group through a zero-padded copy.
      const int64_t whole = n / 8;
      uint8_t seen = 0;
      for (int64_t i = 0; i < n; ++i) {
        seen |= src[begin + i];
      }
      TORCH_CHECK(seen >> k.value == 0, "codes must be < 2**bits = ", 1 << k.value, " for bits = ", k.value);
      pack_groups<k.value>(src + begin, whole, dst + begin / 8 * k.value);
      if (n % 8 != 0) {
        uint8_t last[8] = {};
        std::copy(src + begin + whole * 8, src + begin + n, last);
        pack_groups<k.value>(last, 1, dst + (begin / 8 + whole) * k.value);
      }
    });
  });
  return packed;
}

at::Tensor unpack_bits(const at::Tensor& packed_in, int64_t bits, int64_t numel) {
  TORCH_CHECK(packed_in.scalar_type() == at::kByte, "packed must be uint8, got ", packed_in.scalar_type());
  check_pack_bits(bits);
  TORCH_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
  TORCH_CHECK(packed_in.numel() == packed_nbytes(numel, bits), "packed must hold ceil(numel / 8) * bits = ",
              packed_nbytes(numel, bits), " bytes for numel = ", numel, " at bits = ", bits, ", got ",
              packed_in.numel());
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor codes = at::empty({numel}, packed.options());
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  uint8_t* dst = codes.mutable_data_ptr<uint8_t>();
  dispatch_bits(bits, [&](auto k) {
    for_each_tile(numel, {dst}, [&](int64_t begin, int64_t n) {
      const int64_t whole = n / 8;
      unpack_groups<k.value>(src + begin / 8 * k.value, whole, dst + begin);
      if (n % 8 != 0) {
        uint8_t last[8];
        unpack_groups<k.value>(src + (begin / 8 + whole) * k.value, 1, last);
        std::copy(last, last + n % 8, dst + begin + whole * 8);
      }
    });
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(memkernels, CPU, m) {
  m.impl("pack_bits", &pack_bits);
  m.impl("unpack_bits", &unpack_bits);
}

}  // namespace memkernels::cpu::CPU_CAPABILITY
