// Argument checks shared by the CPU ops: each error names the argument and what was expected.
#pragma once
#include <ATen/ATen.h>

namespace memkernels::cpu {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", t.sizes());
}

}  // namespace memkernels::cpu
