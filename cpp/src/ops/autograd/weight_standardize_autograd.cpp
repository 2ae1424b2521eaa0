// Autograd kernel of matterhorn::weight_standardize_forward: our kernels forward, backward by a
// hand-written node calling matterhorn::weight_standardize_backward. The weight's mean and rstd
// are constants (matterhorn 2.0.0 detaches them), so the map is affine in weight, gamma and beta
// per channel. Where torch must differentiate further (forward-mode AD, or a backward with
// create_graph=True), the same formulas in ATen ops do the work.
#include <mutex>

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "ops/autograd/node.h"
#include "ops/weight_standardize.h"

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Gradients of (weight, gamma, beta); mean and rstd are not differentiable.
struct WeightStandardizeBackward final : torch::autograd::Node {
  SavedVariable weight, gamma, mean, rstd;
  bool has_beta = false;

  std::string name() const override { return "WeightStandardizeBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* saved : {&weight, &gamma, &mean, &rstd}) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return {{}, {}, {}};  // the output was not used
    const at::Tensor w = weight.unpack(), g = gamma.unpack();
    const bool need_weight = task_should_compute_output(0);
    const bool need_gamma = g.defined() && task_should_compute_output(1);
    const bool need_beta = has_beta && task_should_compute_output(2);
    auto [grad_weight, grad_gamma, grad_beta] = [&] {
      if (at::GradMode::is_enabled()) {  // create_graph=True: ATen ops, which torch differentiates again
        return matterhorn::ops::detail::weight_standardize_backward_aten(
            grads[0], w, mean.unpack(), rstd.unpack(), defined_or_none(g));
      }
      at::AutoDispatchBelowADInplaceOrView guard;  // no graph is recorded here: skip autograd's layers
      return matterhorn::ops::detail::call_weight_standardize_backward(
          grads[0], w, mean.unpack(), rstd.unpack(), defined_or_none(g));
    }();
    return {need_weight ? grad_weight : at::Tensor(), need_gamma ? grad_gamma : at::Tensor(),
            need_beta ? grad_beta : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_forward_autograd(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  if (torch::autograd::isFwGradDefined(weight) || torch::autograd::isFwGradDefined(gamma) ||
      torch::autograd::isFwGradDefined(beta)) {  // forward-mode AD: ATen ops, which torch has formulas for
    matterhorn::ops::detail::check_weight_standardize(weight, gamma, beta, eps);
    return matterhorn::ops::detail::weight_standardize_forward_aten(weight, gamma, beta, eps);
  }
  const bool record = torch::autograd::compute_requires_grad(weight, gamma, beta);  // false in no_grad
  auto [output, mean, rstd] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return matterhorn::ops::detail::call_weight_standardize_forward(weight, gamma, beta, eps);
  }();
  if (record) {
    auto node = matterhorn::ops::detail::make_node<WeightStandardizeBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(weight, gamma, beta));
    node->weight = SavedVariable(weight, false);
    node->gamma = SavedVariable(gamma.value_or(at::Tensor()), false);
    node->mean = SavedVariable(mean, false);
    node->rstd = SavedVariable(rstd, false);
    node->has_beta = beta.has_value() && beta->defined();
    torch::autograd::set_history(output, node);
  }
  return {output, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("weight_standardize_forward", &weight_standardize_forward_autograd);
}
