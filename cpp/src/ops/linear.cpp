// matterhorn::linear: schema, argument checks, the shared folded computation and the C++ entry.
#include "ops/linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "matterhorn/ops/linear.h"
#include "ops/checks.h"

namespace matterhorn::ops {
namespace detail {

void check_linear_arguments(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(
      weight.dim() == 2, "Linear: weight must be 2-D [out_features, in_features], got ",
      weight.sym_sizes());
  const c10::SymInt& in_features = weight.sym_size(1);
  TORCH_CHECK_VALUE(
      input.dim() >= 1, "Linear(in_features=", in_features, "): expected input [T, B, ..., ",
      in_features, "] in multi-step mode or [B, ..., ", in_features,
      "] in single-step mode; got a 0-D tensor");
  TORCH_CHECK_VALUE(
      input.sym_size(-1) == in_features, "Linear(in_features=", in_features,
      "): expected input [T, B, ..., ", in_features, "] in multi-step mode or [B, ..., ",
      in_features, "] in single-step mode; got ", input.sym_sizes());
  check_same_dtype_and_device("Linear", input, weight, "weight");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(
        bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0),
        "Linear: bias must be [out_features] = [", weight.sym_size(0), "], got ", bias->sym_sizes());
    check_same_dtype_and_device("Linear", input, *bias, "bias");
  }
}

c10::SymDimVector linear_output_sizes(const at::Tensor& input, const at::Tensor& weight) {
  c10::SymDimVector sizes(input.sym_sizes().begin(), input.sym_sizes().end());
  sizes.back() = weight.sym_size(0);
  return sizes;
}

namespace {

// [..., F] -> [N, F], N the product of the leading sizes (1 for a 1-D input); a view when possible.
at::Tensor fold_leading_dims(const at::Tensor& t) {
  return t.dim() == 1 ? t.unsqueeze(0) : t.flatten(0, -2);
}

}  // namespace

at::Tensor linear_folded(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const at::Tensor rows = fold_leading_dims(input);
  const at::Tensor out = (bias.has_value() && bias->defined())
      ? at::addmm(*bias, rows, weight.t())
      : at::mm(rows, weight.t());
  return out.view_symint(linear_output_sizes(input, weight));
}

}  // namespace detail

at::Tensor linear(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::linear", "")
                             .typed<decltype(linear)>();
  return op.call(input, weight, bias);
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
}

// One kernel for every backend (CompositeExplicitAutograd: CPU, CUDA; Meta has its own, shapes
// only) and for Autograd. It is made of ATen views and addmm / mm, which carry their own
// derivatives and device guards: called above autograd it records torch's own graph
// (AddmmBackward0: double backward, forward AD), that of torch.nn.Linear on the folded tensor,
// while the op stays one node for torch.compile and torch.export.
TORCH_LIBRARY_IMPL(matterhorn, CompositeExplicitAutograd, m) {
  m.impl("linear", &matterhorn::ops::detail::checked_linear);
}

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("linear", &matterhorn::ops::detail::checked_linear);
}
