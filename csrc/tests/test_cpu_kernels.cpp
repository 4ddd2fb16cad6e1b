// C++ tests of the CPU kernels, run by ctest (see CMakeLists.txt): the ops are called through the
// dispatcher, as torch.ops.memkernels.* calls them, against hand-computed values; the vectorized
// kernels are also held to the scalar math of activations.h.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <sys/utsname.h>

#include "activations.h"
#include "cpu/pages.h"

namespace {

using memkernels::Activation;
using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

int failures = 0;

#define EXPECT(cond, ...)                                              \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ++failures;                                                      \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
      std::printf(__VA_ARGS__);                                        \
      std::printf("\n");                                               \
    }                                                                  \
  } while (0)

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensors2 activation_forward(const at::Tensor& x, Activation act, int64_t bits, const OptTensor& borders,
                            double p0 = 0, double p1 = 0) {
  static auto handle = op<Tensors2(const at::Tensor&, int64_t, double, double, int64_t, const OptTensor&)>(
      "memkernels::activation_forward");
  return handle.call(x, static_cast<int64_t>(act), p0, p1, bits, borders);
}
at::Tensor activation_backward(const at::Tensor& g, const at::Tensor& saved, int64_t bits, const OptTensor& levels) {
  static auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&)>("memkernels::activation_backward");
  return handle.call(g, saved, bits, levels);
}
Tensors2 gated_forward(const at::Tensor& a, const at::Tensor& b, Activation act, int64_t bits, const OptTensor& borders) {
  static auto handle = op<Tensors2(const at::Tensor&, const at::Tensor&, int64_t, int64_t, const OptTensor&)>(
      "memkernels::gated_forward");
  return handle.call(a, b, static_cast<int64_t>(act), bits, borders);
}
Tensors2 gated_backward(const at::Tensor& g, const at::Tensor& saved_a, const at::Tensor& b, Activation act,
                        int64_t bits, const OptTensor& levels, const OptTensor& value_levels) {
  static auto handle = op<Tensors2(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                   const OptTensor&, const OptTensor&)>("memkernels::gated_backward");
  return handle.call(g, saved_a, b, static_cast<int64_t>(act), bits, levels, value_levels);
}
at::Tensor pack_bits(const at::Tensor& codes, int64_t bits) {
  static auto handle = op<at::Tensor(const at::Tensor&, int64_t)>("memkernels::pack_bits");
  return handle.call(codes, bits);
}
at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, int64_t numel) {
  static auto handle = op<at::Tensor(const at::Tensor&, int64_t, int64_t)>("memkernels::unpack_bits");
  return handle.call(packed, bits, numel);
}

at::Tensor floats(std::vector<float> values) { return at::tensor(values, at::kFloat); }

bool near(float got, float want, float tol = 1e-6f) {
  return got == want || (std::isnan(got) && std::isnan(want)) || std::abs(got - want) <= tol * (1 + std::abs(want));
}

void expect_values(const at::Tensor& got, const std::vector<float>& want, const char* what) {
  const at::Tensor g = got.to(at::kFloat).contiguous();
  EXPECT(g.numel() == static_cast<int64_t>(want.size()), "%s: %lld values", what, (long long)g.numel());
  for (int64_t i = 0; i < std::min<int64_t>(g.numel(), want.size()); ++i) {
    const float v = g.data_ptr<float>()[i];
    EXPECT(near(v, want[i]), "%s[%lld] = %.9g, want %.9g", what, (long long)i, v, want[i]);
  }
}

void test_pack_unpack_round_trip() {
  for (int64_t bits : {1, 2, 3, 4, 8}) {
    for (int64_t numel : {0, 1, 7, 8, 9, 37, 1000}) {
      const at::Tensor codes = at::randint(0, int64_t{1} << bits, {numel}, at::kByte);
      const at::Tensor packed = pack_bits(codes, bits);
      EXPECT(packed.numel() == (numel + 7) / 8 * bits, "bits %lld numel %lld: %lld bytes", (long long)bits,
             (long long)numel, (long long)packed.numel());
      EXPECT(at::equal(unpack_bits(packed, bits, numel), codes), "round trip bits %lld numel %lld", (long long)bits,
             (long long)numel);
    }
  }
}

void test_pack_layout() {
  // k = 3, codes 1..7, 0: the 24-bit little-endian word sum(c_j << 3j).
  const at::Tensor packed = pack_bits(at::tensor(std::vector<uint8_t>{1, 2, 3, 4, 5, 6, 7, 0}, at::kByte), 3);
  uint32_t word = 0;
  for (uint32_t j = 0; j < 8; ++j) word |= ((j + 1) % 8) << (3 * j);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  EXPECT(packed.numel() == 3 && p[0] == (word & 0xFF) && p[1] == ((word >> 8) & 0xFF) && p[2] == (word >> 16),
         "bytes %d %d %d, want word %u", p[0], p[1], p[2], word);
}

void test_exact_forward_backward() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  auto [y, d] = activation_forward(floats({-1, 0, 2, nan}), Activation::RELU, 0, std::nullopt);
  expect_values(y, {0, 0, 2, nan}, "relu y");
  expect_values(d, {0, 0, 1, nan}, "relu d");
  // GELU: Phi(1) = 0.841344746, phi(1) = 0.241970725; f'(x) = Phi(x) + x phi(x).
  std::tie(y, d) = activation_forward(floats({0, 1, inf, -inf}), Activation::GELU, 0, std::nullopt);
  expect_values(y.slice(0, 0, 3), {0, 0.841344746f, inf}, "gelu y");
  expect_values(d, {0.5f, 0.841344746f + 0.241970725f, 1, 0}, "gelu d");
  std::tie(y, d) = activation_forward(floats({-2, 3}), Activation::LEAKY_RELU, 0, std::nullopt, 0.25);
  expect_values(y, {-0.5f, 3}, "leaky y");
  expect_values(d, {0.25f, 1}, "leaky d");
  expect_values(activation_backward(floats({2, -3}), floats({0.5f, 4}), 0, std::nullopt), {1, -12}, "backward");
  // bfloat16 in, bfloat16 out, computed in float.
  std::tie(y, d) = activation_forward(floats({0, 1}).to(at::kBFloat16), Activation::SILU, 0, std::nullopt);
  EXPECT(y.scalar_type() == at::kBFloat16 && d.scalar_type() == at::kBFloat16, "bf16 outputs");
  expect_values(d.slice(0, 0, 1), {0.5f}, "silu d bf16");
}

void test_coded_forward_backward() {
  // borders -1, 0, 1 (bits 2): code = #{borders < x}, NaN -> 0.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto [y, packed] = activation_forward(floats({-2, -1, -0.5f, 0, 0.5f, 1, 2, nan}), Activation::GELU, 2,
                                        floats({-1, 0, 1}));
  // codes 0 0 1 1 2 2 3 0 -> word 0x3A50
  EXPECT(packed.numel() == 2 && packed.data_ptr<uint8_t>()[0] == 0x50 && packed.data_ptr<uint8_t>()[1] == 0x3A,
         "packed %d %d", packed.data_ptr<uint8_t>()[0], packed.data_ptr<uint8_t>()[1]);
  const at::Tensor grad = activation_backward(at::ones({8}), packed, 2, floats({10, 20, 30, 40}));
  expect_values(grad, {10, 10, 20, 20, 30, 30, 40, 10}, "levels[code]");
}

void test_gated() {
  auto [y, code] = gated_forward(floats({1}), floats({2}), Activation::GELU, 0, std::nullopt);
  expect_values(y, {2 * 0.841344746f}, "gated y");
  EXPECT(code.numel() == 0 && code.scalar_type() == at::kByte, "bits 0: empty uint8 code");
  auto [grad_a, grad_b] = gated_backward(floats({1}), floats({1}), floats({2}), Activation::GELU, 0, std::nullopt,
                                         std::nullopt);
  expect_values(grad_a, {2 * (0.841344746f + 0.241970725f)}, "gated grad_a");
  expect_values(grad_b, {0.841344746f}, "gated grad_b");
}

// The vectorized kernels (Sleef math) against activations.h's scalar math (libm), every activation.
void test_kernels_match_scalar_math() {
  const at::Tensor x = at::linspace(-8, 8, 1001, at::kFloat);
  for (int64_t id = 0; id < memkernels::kNumActivations; ++id) {
    const Activation act = static_cast<Activation>(id);
    const float p0 = id == 6 ? 1.5f : 0.3f, p1 = id == 6 ? 10.f : 0.f;
    auto [y, d] = activation_forward(x, act, 0, std::nullopt, p0, p1);
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float xi = x.data_ptr<float>()[i];
      const float want_y = memkernels::activation_value<float>(act, xi, p0, p1);
      const float want_d = memkernels::activation_derivative<float>(act, xi, p0, p1);
      EXPECT(near(y.data_ptr<float>()[i], want_y, 1e-5f), "act %lld f(%g) = %.9g, scalar %.9g", (long long)id, xi,
             y.data_ptr<float>()[i], want_y);
      EXPECT(near(d.data_ptr<float>()[i], want_d, 1e-5f), "act %lld f'(%g) = %.9g, scalar %.9g", (long long)id, xi,
             d.data_ptr<float>()[i], want_d);
    }
  }
}

void test_errors() {
  const at::Tensor x = at::randn({8});
  auto raises = [](auto&& fn, const std::string& needle) {
    try {
      fn();
    } catch (const c10::Error& e) {
      return std::string(e.what()).find(needle) != std::string::npos;
    }
    return false;
  };
  EXPECT(raises([&] { activation_forward(x, Activation::GELU, 5, std::nullopt); }, "bits"), "bits 5");
  EXPECT(raises([&] { activation_forward(x, Activation::GELU, 3, std::nullopt); }, "borders"), "no borders");
  EXPECT(raises([&] { activation_backward(x, x.slice(0, 0, 4), 0, std::nullopt); }, "saved"), "saved shape");
  EXPECT(raises([&] { gated_forward(x, x, Activation::TANH, 0, std::nullopt); }, "gated"), "gate");
  EXPECT(raises([&] { unpack_bits(at::zeros({2}, at::kByte), 3, 8); }, "packed"), "packed size");
}

// populate_fresh_pages fills a mapping never written, in one call where the kernel has
// MADV_POPULATE_WRITE (Linux 5.14), and leaves written pages and small ranges alone.
void test_populate_fresh_pages() {
  using memkernels::cpu::kPopulateBytes;
  using memkernels::cpu::populate_fresh_pages;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t bytes = static_cast<size_t>(kPopulateBytes) + page + 100;  // whole pages and a part of the last
  const size_t mapped = (bytes + page - 1) / page * page;
  std::vector<unsigned char> resident(mapped / page);
  const auto resident_pages = [&](void* p) {
    mincore(p, mapped, resident.data());
    size_t n = 0;
    for (unsigned char r : resident) n += r & 1;
    return n;
  };
  utsname system{};
  uname(&system);
  int major = 0, minor = 0;
  std::sscanf(system.release, "%d.%d", &major, &minor);
  const bool has_populate = major > 5 || (major == 5 && minor >= 14);

  char* fresh = static_cast<char*>(mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  EXPECT(fresh != MAP_FAILED, "mmap of %zu bytes", mapped);
  EXPECT(resident_pages(fresh) == 0, "a fresh mapping has %zu resident pages", resident_pages(fresh));
  const bool populated = populate_fresh_pages(fresh + 100, static_cast<int64_t>(bytes - 100));
  EXPECT(populated == has_populate, "populated %d on Linux %s", populated, system.release);
  if (populated) {
    EXPECT(resident_pages(fresh) == mapped / page, "%zu of %zu pages resident after populating",
           resident_pages(fresh), mapped / page);
  }
  for (size_t i = 0; i < mapped; i += page) EXPECT(fresh[i] == 0, "byte %zu of a populated page = %d", i, fresh[i]);
  // Written pages: no system call past the check, and the data stays.
  std::memset(fresh, 7, mapped);
  EXPECT(!populate_fresh_pages(fresh, static_cast<int64_t>(bytes)), "populated pages already written");
  EXPECT(fresh[0] == 7 && fresh[mapped - 1] == 7, "written bytes changed to %d, %d", fresh[0], fresh[mapped - 1]);
  munmap(fresh, mapped);

  char* small = static_cast<char*>(mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  EXPECT(!populate_fresh_pages(small, kPopulateBytes - 1), "populated a range under kPopulateBytes");
  EXPECT(resident_pages(small) == 0, "%zu pages resident after a small range", resident_pages(small));
  munmap(small, mapped);
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_pack_unpack_round_trip();
  test_pack_layout();
  test_exact_forward_backward();
  test_coded_forward_backward();
  test_gated();
  test_kernels_match_scalar_math();
  test_errors();
  test_populate_fresh_pages();
  if (failures > 0) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("all CPU kernel tests passed\n");
  return 0;
}
