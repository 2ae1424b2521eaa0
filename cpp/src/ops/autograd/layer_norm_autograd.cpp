// Autograd kernel of matterhorn::layer_norm_normalize: our kernels forward, backward by a
// hand-written node calling matterhorn::layer_norm_backward. Where torch must differentiate
// further (forward-mode AD, or a backward with create_graph=True), ATen's layer norm does the
// work: torch has formulas for those, our kernels do not.
#include <array>
#include <mutex>

#include <ATen/OpMathType.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ExpandUtils.h>  // at::sum_to
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "ops/autograd/node.h"
#include "ops/layer_norm.h"

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using matterhorn::ops::detail::statistics_shape;

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Gradients of (input, weight, bias); the statistics are not differentiable.
struct LayerNormNormalizeBackward final : torch::autograd::Node {
  SavedVariable input, weight, bias, mean, rstd;
  std::vector<c10::SymInt> normalized_shape;
  double eps = 0;

  std::string name() const override { return "LayerNormNormalizeBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* saved : {&input, &weight, &bias, &mean, &rstd}) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return {{}, {}, {}};  // the output was not used
    const at::Tensor x = input.unpack(), w = weight.unpack(), b = bias.unpack();
    const bool need_input = task_should_compute_output(0);
    const bool need_weight = w.defined() && task_should_compute_output(1);
    const bool need_bias = b.defined() && task_should_compute_output(2);
    if (at::GradMode::is_enabled()) return differentiable_backward(grads[0], x, w, b, {need_input, need_weight, need_bias});
    at::AutoDispatchBelowADInplaceOrView guard;  // no graph is recorded here: skip autograd's layers
    auto [grad_input, grad_weight, grad_bias] = matterhorn::ops::detail::call_backward(
        grads[0], x, normalized_shape, mean.unpack(), rstd.unpack(), defined_or_none(w));
    if (need_bias && !w.defined()) grad_bias = at::sum_to(grads[0], b.sym_sizes());  // a bias alone
    return {need_input ? grad_input : at::Tensor(), need_weight ? grad_weight : at::Tensor(),
            need_bias ? grad_bias : at::Tensor()};
  }

  // create_graph=True: ATen's backward, which torch differentiates again, with the statistics
  // recomputed in ATen's own shape and dtype.
  variable_list differentiable_backward(
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
      std::array<bool, 3> needs) {
    at::Tensor aten_mean, aten_rstd;
    {
      at::NoGradGuard no_grad;
      std::tie(std::ignore, aten_mean, aten_rstd) =
          at::native_layer_norm_symint(x, normalized_shape, std::nullopt, std::nullopt, eps);
    }
    // the bias's gradient, the sum of grad over the rows, from sum_to: ATen's double backward of
    // it is wrong without a weight (torch 2.13: gradgradcheck of F.layer_norm(x, shape, None, b) fails)
    auto [grad_input, grad_weight, unused] = at::native_layer_norm_backward_symint(
        grad, x, normalized_shape, aten_mean, aten_rstd, defined_or_none(w), std::nullopt, {needs[0], needs[1], false});
    return {grad_input, grad_weight, needs[2] ? at::sum_to(grad, b.sym_sizes()) : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_normalize_autograd(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  if (torch::autograd::isFwGradDefined(input) || torch::autograd::isFwGradDefined(weight) ||
      torch::autograd::isFwGradDefined(bias)) {  // forward-mode AD: ATen's op, which torch has formulas for
    auto [output, mean, rstd] = at::native_layer_norm_symint(input, normalized_shape, weight, bias, eps);
    const auto stats_shape = statistics_shape(input, normalized_shape);
    const auto acc_type = at::toOpMathType(input.scalar_type());
    return {output, mean.view_symint(stats_shape).to(acc_type), rstd.view_symint(stats_shape).to(acc_type)};
  }
  const bool record = torch::autograd::compute_requires_grad(input, weight, bias);  // false in no_grad
  auto [output, mean, rstd] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return matterhorn::ops::detail::call_normalize(input, normalized_shape, weight, bias, eps);
  }();
  if (record) {
    auto node = matterhorn::ops::detail::make_node<LayerNormNormalizeBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    node->input = SavedVariable(input, false);
    node->weight = SavedVariable(weight, false);
    node->bias = SavedVariable(bias, false);
    node->mean = SavedVariable(mean, false);
    node->rstd = SavedVariable(rstd, false);
    node->normalized_shape.assign(normalized_shape.begin(), normalized_shape.end());
    node->eps = eps;
    torch::autograd::set_history(output, node);
  }
  return {output, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("layer_norm_normalize", &layer_norm_normalize_autograd);
}
