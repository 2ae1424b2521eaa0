// Meta kernels of the BatchNorm building blocks: shapes, dtypes and memory formats only.
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops/batch_norm.h"

namespace {

using namespace matterhorn::ops::detail;

// [G, C] statistics in the accumulation type.
at::Tensor per_channel(const at::Tensor& input, int64_t groups) {
  return at::empty_symint(
      {c10::SymInt(groups), input.sym_size(1)},
      input.options().dtype(at::toOpMathType(input.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> stats_meta(const at::Tensor& input, int64_t groups) {
  check_stats_arguments(input, groups);
  return {per_channel(input, groups), per_channel(input, groups)};
}

at::Tensor elemt_meta(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                      int64_t groups, const std::optional<at::Tensor>& scale) {
  check_elemt_arguments(input, mean, var, weight, bias, eps, groups, scale);
  return at::empty_like(input);
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_meta(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups) {
  check_backward_reduce_arguments(grad_output, input, mean, groups);
  return {per_channel(input, groups), per_channel(input, groups)};
}

at::Tensor backward_elemt_meta(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    c10::SymInt count, int64_t groups, const std::optional<at::Tensor>& scale) {
  check_backward_elemt_arguments(
      grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, eps, count, groups, scale);
  return at::empty_like(input);
}

// The running statistics are updated in place: nothing to compute on meta tensors, but the same
// arguments are refused as on a device.
void update_stats_meta(const at::Tensor& mean, const at::Tensor& var, c10::SymInt count,
                       const at::Tensor& running_mean, const at::Tensor& running_var,
                       const std::optional<at::Tensor>& num_batches_tracked, std::optional<double>) {
  check_update_stats_arguments(mean, var, count, running_mean, running_var, num_batches_tracked);
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Meta, m) {
  m.impl("batch_norm_stats", &stats_meta);
  m.impl("batch_norm_elemt", &elemt_meta);
  m.impl("batch_norm_backward_reduce", &backward_reduce_meta);
  m.impl("batch_norm_backward_elemt", &backward_elemt_meta);
  m.impl("batch_norm_update_stats", &update_stats_meta);
}
