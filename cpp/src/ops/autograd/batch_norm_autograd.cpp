// Autograd kernel of matterhorn::batch_norm_normalize: forward with the statistics kernels, backward
// with one reduction pass and one element pass (matterhorn::batch_norm_backward_reduce / _elemt).
// The backward is a hand-written autograd node, as torch's generated ones are: the generic
// torch::autograd::Function costs about 12 us more per step (its context, output wrapping).
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "ops/autograd/node.h"
#include "ops/batch_norm.h"

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Edges to the gradients of (input, weight, bias, scale); the statistics are not differentiable.
struct BatchNormNormalizeBackward final : torch::autograd::Node {
  SavedVariable input, weight, bias, scale, mean, var;  // without batch statistics: the running ones
  bool scaled = false;  // bias is saved only with a scale (its gradient reads it)
  bool batch_statistics = true;
  double eps = 0;
  int64_t groups = 1;

  std::string name() const override { return "BatchNormNormalizeBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input.reset_data();
    weight.reset_data();
    bias.reset_data();
    scale.reset_data();
    mean.reset_data();
    var.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(
        !at::GradMode::is_enabled(),
        "BatchNorm: double backward (create_graph=True) is not supported by matterhorn's BatchNorm");
    const std::array<bool, 4> needs{
        task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2),
        scaled && task_should_compute_output(3)};
    if (!grads[0].defined()) return {{}, {}, {}, {}};  // the output was not used
    const auto statistic = [&](const SavedVariable& s) {  // [G, C] or [1, C]
      const at::Tensor t = s.unpack();
      return t.dim() == 1 ? t.unsqueeze(0) : t;
    };
    const auto optional = [](const SavedVariable& s) -> std::optional<at::Tensor> {
      at::Tensor t = s.unpack();
      return t.defined() ? std::optional<at::Tensor>(std::move(t)) : std::nullopt;
    };
    at::AutoDispatchBelowADInplaceOrView guard;  // no graph is recorded here: skip autograd's layers
    auto [grad_input, grad_weight, grad_bias, grad_scale] = matterhorn::ops::detail::normalize_backward(
        grads[0], input.unpack(), optional(weight), optional(bias), statistic(mean), statistic(var),
        batch_statistics, eps, groups, optional(scale), needs);
    return {grad_input, grad_weight, grad_bias, grad_scale};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_normalize_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(
      !torch::autograd::isFwGradDefined(input) && !torch::autograd::isFwGradDefined(weight) &&
          !torch::autograd::isFwGradDefined(bias) && !torch::autograd::isFwGradDefined(scale),
      "BatchNorm: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by matterhorn's "
      "BatchNorm");
  const bool record = torch::autograd::compute_requires_grad(input, weight, bias, scale);  // false in no_grad
  auto [output, mean, var] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return matterhorn::ops::detail::normalize_forward(
        input, weight, bias, running_mean, running_var, batch_statistics, eps, groups, scale);
  }();
  if (record) {
    auto node = matterhorn::ops::detail::make_node<BatchNormNormalizeBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, scale));
    node->input = SavedVariable(input, false);
    node->weight = SavedVariable(weight, false);
    node->scaled = scale.has_value() && scale->defined();
    if (node->scaled) {
      node->scale = SavedVariable(*scale, false);
      node->bias = SavedVariable(bias, false);
    }
    // without batch statistics the backward's constants are the running statistics, saved as they
    // are (so that changing them before the backward is an error, as in torch)
    node->mean = SavedVariable(batch_statistics ? mean : *running_mean, false);
    node->var = SavedVariable(batch_statistics ? var : *running_var, false);
    node->batch_statistics = batch_statistics;
    node->eps = eps;
    node->groups = groups;
    torch::autograd::set_history(output, node);
  }
  return {output, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("batch_norm_normalize", &batch_norm_normalize_autograd);
}
