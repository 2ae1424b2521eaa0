// CUDA kernels of matterhorn::conv / conv_transpose: one folded at::convolution (cuDNN).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/conv.h"

namespace {

at::Tensor cuda_convolution(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
    bool transposed, c10::SymIntArrayRef output_padding, c10::SymInt groups) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  return matterhorn::ops::detail::aten_convolution(
      input, weight, bias, stride, padding, dilation, transposed, output_padding, std::move(groups));
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, CUDA, m) {
  using namespace matterhorn::ops::detail;
  m.impl("conv", &conv_kernel<&cuda_convolution>);
  m.impl("conv_transpose", &conv_transpose_kernel<&cuda_convolution>);
}
