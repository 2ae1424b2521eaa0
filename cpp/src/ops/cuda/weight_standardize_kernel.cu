// CUDA kernels of the weight standardisation building blocks: ATen's own CUDA ops (a weight is
// small beside the activations the convolution reads), in the layout the Meta kernel gives.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/weight_standardize.h"

namespace {

using namespace matterhorn::ops::detail;

// t with the strides empty_like_weight gives (a copy only for weights without dense rows).
at::Tensor in_weight_layout(const at::Tensor& t, const at::Tensor& weight) {
  const bool matches = has_dense_rows(weight) ? t.strides() == weight.strides() : t.is_contiguous();
  return matches ? t : empty_like_weight(weight).copy_(t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  check_weight_standardize(weight, gamma, beta, eps);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  auto [out, mean, rstd] = weight_standardize_forward_aten(weight, gamma, beta, eps);
  return {in_weight_layout(out, weight), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma) {
  check_weight_standardize_backward(grad_output, weight, mean, rstd, gamma);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  auto [grad_weight, grad_gamma, grad_beta] = weight_standardize_backward_aten(grad_output, weight, mean, rstd, gamma);
  return {in_weight_layout(grad_weight, weight), grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, CUDA, m) {
  m.impl("weight_standardize_forward", &forward_cuda);
  m.impl("weight_standardize_backward", &backward_cuda);
}
