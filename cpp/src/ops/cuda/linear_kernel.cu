// CUDA kernel of matterhorn::linear: the folded GEMM through ATen (cuBLAS does the arithmetic).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/linear.h"

namespace {

at::Tensor linear_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return matterhorn::ops::detail::checked_linear(input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, CUDA, m) {
  m.impl("linear", &linear_cuda);
}
