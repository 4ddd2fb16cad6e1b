// How the backward ops of CPU and CUDA read an incoming gradient.
#pragma once
#include <ATen/core/Tensor.h>

namespace memkernels {

// Whether t holds one value broadcast to every element: each dim of more than one element has
// stride 0 (an expanded scalar, what autograd hands an activation's backward for y.sum()). The
// backward kernels read such a grad_out as that one value, where a contiguous copy would allocate
// a full-size tensor that torch's own backward (through TensorIterator) does not. Other strided
// gradients are copied.
inline bool broadcasts_one_value(const at::Tensor& t) {
  if (t.numel() == 0) {
    return false;
  }
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != 0) {
      return false;
    }
  }
  return true;
}

}  // namespace memkernels
