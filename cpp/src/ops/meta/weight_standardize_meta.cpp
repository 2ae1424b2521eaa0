// Meta kernels of the weight standardisation building blocks: checks, shapes, dtypes and the
// output's strides (those the CPU and CUDA kernels give).
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/weight_standardize.h"

namespace {

using namespace matterhorn::ops::detail;

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_meta(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  check_weight_standardize(weight, gamma, beta, eps);
  const auto stats_options = weight.options().dtype(at::toOpMathType(weight.scalar_type()));
  return {empty_like_weight(weight), at::empty_symint({weight.sym_size(0)}, stats_options),
          at::empty_symint({weight.sym_size(0)}, stats_options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma) {
  check_weight_standardize_backward(grad_output, weight, mean, rstd, gamma);
  const bool affine = gamma.has_value() && gamma->defined();
  return {empty_like_weight(weight),
          affine ? at::empty_symint({weight.sym_size(0)}, weight.options()) : at::empty({0}, weight.options()),
          at::empty_symint({weight.sym_size(0)}, weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Meta, m) {
  m.impl("weight_standardize_forward", &forward_meta);
  m.impl("weight_standardize_backward", &backward_meta);
}
