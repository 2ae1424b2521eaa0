// CUDA kernels of the LayerNorm building blocks: ATen's own CUDA layer norm, its statistics
// reshaped from ATen's [N..., 1, ...] to ours, [N...].
#include <ATen/ops/empty.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/layer_norm.h"

namespace {

using matterhorn::ops::detail::check_layer_norm_backward_block;
using matterhorn::ops::detail::check_layer_norm_block;
using matterhorn::ops::detail::statistics_shape;

std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_cuda(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_layer_norm_block("layer_norm_normalize", input, normalized_shape, weight, bias);
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto [output, mean, rstd] = at::native_layer_norm_symint(input, normalized_shape, weight, bias, eps);
  const auto stats_shape = statistics_shape(input, normalized_shape);
  return {output, mean.view_symint(stats_shape), rstd.view_symint(stats_shape)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight) {
  check_layer_norm_backward_block(grad_output, input, normalized_shape, mean, rstd, weight);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const bool affine = weight.has_value() && weight->defined();
  std::vector<c10::SymInt> aten_stats_shape(input.sym_sizes().begin(), input.sym_sizes().end());
  std::fill(aten_stats_shape.end() - static_cast<int64_t>(normalized_shape.size()), aten_stats_shape.end(), 1);
  // ATen takes the bias only for the shape of its gradient: the weight has the same
  auto [grad_input, grad_weight, grad_bias] = at::native_layer_norm_backward_symint(
      grad_output, input, normalized_shape, mean.view_symint(aten_stats_shape), rstd.view_symint(aten_stats_shape),
      weight, weight, {true, affine, affine});
  if (!affine) {
    grad_weight = at::empty({0}, input.options());
    grad_bias = at::empty({0}, input.options());
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, CUDA, m) {
  m.impl("layer_norm_normalize", &normalize_cuda);
  m.impl("layer_norm_backward", &backward_cuda);
}
