// Meta kernels of the BatchNorm building blocks: shapes, dtypes and memory formats only.
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops/batch_norm.h"

namespace {

using matterhorn::ops::detail::check_batch_norm_block;

// [G, C] statistics in the accumulation type.
at::Tensor per_channel(const at::Tensor& input, int64_t groups) {
  return at::empty_symint(
      {c10::SymInt(groups), input.sym_size(1)},
      input.options().dtype(at::toOpMathType(input.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> stats_meta(const at::Tensor& input, int64_t groups) {
  check_batch_norm_block("batch_norm_stats", input, groups);
  return {per_channel(input, groups), per_channel(input, groups)};
}

at::Tensor elemt_meta(const at::Tensor& input, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, double, int64_t groups) {
  check_batch_norm_block("batch_norm_elemt", input, groups);
  return at::empty_like(input);
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_meta(
    const at::Tensor&, const at::Tensor& input, const at::Tensor&, int64_t groups) {
  check_batch_norm_block("batch_norm_backward_reduce", input, groups);
  return {per_channel(input, groups), per_channel(input, groups)};
}

at::Tensor backward_elemt_meta(
    const at::Tensor&, const at::Tensor& input, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, double, c10::SymInt, int64_t groups) {
  check_batch_norm_block("batch_norm_backward_elemt", input, groups);
  return at::empty_like(input);
}

// The running statistics are updated in place: nothing to compute on meta tensors.
void update_stats_meta(const at::Tensor&, const at::Tensor&, c10::SymInt, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&, std::optional<double>) {}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Meta, m) {
  m.impl("batch_norm_stats", &stats_meta);
  m.impl("batch_norm_elemt", &elemt_meta);
  m.impl("batch_norm_backward_reduce", &backward_reduce_meta);
  m.impl("batch_norm_backward_elemt", &backward_elemt_meta);
  m.impl("batch_norm_update_stats", &update_stats_meta);
}
