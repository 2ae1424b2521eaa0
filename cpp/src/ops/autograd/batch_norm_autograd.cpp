// Autograd kernel of matterhorn::batch_norm_normalize: forward with the statistics kernels, backward
// with one reduction pass and one element pass (matterhorn::batch_norm_backward_reduce / _elemt).
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/batch_norm.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct BatchNormNormalizeFunction : public torch::autograd::Function<BatchNormNormalizeFunction> {
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var, bool batch_statistics, double eps, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, mean, var] = matterhorn::ops::detail::normalize_forward(
        input, weight, bias, running_mean, running_var, batch_statistics, eps, groups);
    const bool has_weight = weight.has_value() && weight->defined();
    // without batch statistics the backward's constants are the running statistics, saved as they
    // are (so that changing them before the backward is an error, as in torch)
    ctx->save_for_backward({input, has_weight ? *weight : at::Tensor(), batch_statistics ? mean : *running_mean,
                            batch_statistics ? var : *running_var});
    ctx->saved_data["batch_statistics"] = batch_statistics;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["groups"] = batch_statistics ? groups : 1;
    ctx->saved_data["has_weight"] = has_weight;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, var});  // they feed the running statistics only
    ctx->set_materialize_grads(false);           // so no zero gradients are made for them
    return {output, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(
        !at::GradMode::is_enabled(),
        "BatchNorm: double backward (create_graph=True) is not supported by matterhorn's BatchNorm");
    if (!grad_outputs[0].defined()) return {{}, {}, {}, {}, {}, {}, {}, {}};  // the output was not used
    const auto saved = ctx->get_saved_variables();
    const bool batch_statistics = ctx->saved_data["batch_statistics"].toBool();
    const auto statistic = [&](const at::Tensor& t) { return batch_statistics ? t : t.unsqueeze(0); };  // [G, C]
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts only the tensors that were given: an absent weight shifts the bias.
    const std::array<bool, 3> needs{
        ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
        has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    at::AutoDispatchBelowADInplaceOrView guard;  // no graph is recorded here: skip autograd's layers
    auto [grad_input, grad_weight, grad_bias] = matterhorn::ops::detail::normalize_backward(
        grad_outputs[0], saved[0], has_weight ? std::optional<at::Tensor>(saved[1]) : std::nullopt, statistic(saved[2]),
        statistic(saved[3]), batch_statistics, ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["groups"].toInt(), needs);
    return {grad_input, grad_weight, grad_bias, {}, {}, {}, {}, {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_normalize_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups) {
  const auto requires_grad = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    // no graph to record (inference): skip the autograd node and what it saves
    at::AutoDispatchBelowADInplaceOrView guard;
    return matterhorn::ops::detail::normalize_forward(
        input, weight, bias, running_mean, running_var, batch_statistics, eps, groups);
  }
  const auto outputs = BatchNormNormalizeFunction::apply(
      input, weight, bias, running_mean, running_var, batch_statistics, eps, groups);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("batch_norm_normalize", &batch_norm_normalize_autograd);
}
