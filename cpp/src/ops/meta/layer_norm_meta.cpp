// Meta kernels of the LayerNorm building blocks: shapes and dtypes only.
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops/layer_norm.h"

namespace {

using matterhorn::ops::detail::check_layer_norm_backward_block;
using matterhorn::ops::detail::check_layer_norm_block;
using matterhorn::ops::detail::statistics_shape;

std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_meta(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double) {
  check_layer_norm_block("layer_norm_normalize", input, normalized_shape, weight, bias);
  const auto stats_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  const auto stats_shape = statistics_shape(input, normalized_shape);
  return {at::empty_like(input, at::MemoryFormat::Contiguous), at::empty_symint(stats_shape, stats_options),
          at::empty_symint(stats_shape, stats_options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_output, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight) {
  check_layer_norm_backward_block(grad_output, input, normalized_shape, mean, rstd, weight);
  const bool affine = weight.has_value() && weight->defined();
  const auto param_grad = [&] {
    return affine ? at::empty_like(*weight, at::MemoryFormat::Contiguous) : at::empty({0}, input.options());
  };
  return {at::empty_like(input, at::MemoryFormat::Contiguous), param_grad(), param_grad()};
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Meta, m) {
  m.impl("layer_norm_normalize", &normalize_meta);
  m.impl("layer_norm_backward", &backward_meta);
}
