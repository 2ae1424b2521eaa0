// Meta kernel of matterhorn::linear: checks and output shape only, SymInt-clean so that
// torch.compile and torch.export trace dynamic T and B without a graph break.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/linear.h"

namespace {

at::Tensor linear_meta(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  matterhorn::ops::detail::check_linear_arguments(input, weight, bias);
  return at::empty_symint(
      matterhorn::ops::detail::linear_output_sizes(input, weight), input.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Meta, m) {
  m.impl("linear", &linear_meta);
}
