// Autograd kernel of matterhorn::linear. The backward is written with differentiable ATen ops,
// so double backward (gradgradcheck) works and torch.compile traces it as plain aten ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "matterhorn/ops/linear.h"
#include "ops/linear.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& weight,
      const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({input, weight});
    // An absent bias is not an autograd input: needs_input_grad(2) exists only with a bias.
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    return matterhorn::ops::linear(input, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    using matterhorn::ops::detail::fold_leading_dims;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor grad_rows = fold_leading_dims(grad_outputs[0]);  // [N, O]
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_input = grad_rows.mm(weight).view_symint(input.sym_sizes());
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = grad_rows.t().mm(fold_leading_dims(input));
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = grad_rows.sum(0);
    }
    return {grad_input, grad_weight, grad_bias};
  }
};

at::Tensor linear_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return LinearFunction::apply(input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("linear", &linear_autograd);
}
