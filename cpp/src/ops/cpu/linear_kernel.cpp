// CPU kernel of matterhorn::linear: the folded GEMM through ATen (oneDNN/MKL do the arithmetic).
#include <torch/library.h>

#include "ops/linear.h"

namespace {

at::Tensor linear_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  matterhorn::ops::detail::check_linear_arguments(input, weight, bias);
  return matterhorn::ops::detail::linear_folded(input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, CPU, m) {
  m.impl("linear", &linear_cpu);
}
