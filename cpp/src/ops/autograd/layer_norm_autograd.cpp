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
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include "ops/autograd/node.h"
#include "ops/layer_norm.h"
#include "ops/norm_common.h"

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using matterhorn::ops::detail::statistics_shape;

using matterhorn::ops::detail::defined_or_none;

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
    return backward(grads[0], x, w, b, mean.unpack(), rstd.unpack(), normalized_shape,
                    {need_input, need_weight, need_bias});
  }

  static variable_list backward(
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& m,
      const at::Tensor& r, c10::SymIntArrayRef shape, std::array<bool, 3> needs) {
    auto [grad_input, grad_weight, grad_bias] =
        matterhorn::ops::detail::call_backward(grad, x, shape, m, r, defined_or_none(w));
    if (needs[2] && !w.defined()) grad_bias = at::sum_to(grad, b.sym_sizes());  // a bias alone
    return {needs[0] ? grad_input : at::Tensor(), needs[1] ? grad_weight : at::Tensor(),
            needs[2] ? grad_bias : at::Tensor()};
  }

  // Compiled autograd: as BatchNorm's node (ops/autograd/batch_norm_autograd.cpp).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&input, &weight, &bias, &mean, &rstd}) args.collect(*v, false);
    args.collect(normalized_shape);
    args.collect(eps);
  }

  variable_list apply_with_saved(
      const variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) override {
    namespace compiled = torch::dynamo::autograd;
    for (SavedVariable* v : {&input, &weight, &bias, &mean, &rstd}) saved.before(*v);
    saved.before(normalized_shape);
    compiled::PackedArgs packed;
    for (const SavedVariable* v : {&input, &weight, &bias, &mean, &rstd}) packed.pack(defined_or_none(v->unpack()));
    packed.pack(normalized_shape);
    const at::Tensor w = weight.unpack(), b = bias.unpack();
    packed.pack(std::vector<bool>{task_should_compute_output(0), w.defined() && task_should_compute_output(1),
                                  b.defined() && task_should_compute_output(2)});
    const std::vector<c10::IValue>& args = packed.vec();
    std::vector<at::TypePtr> schema;
    for (const c10::IValue& value : args) schema.push_back(value.isTensor() ? at::TensorType::get() : value.type());
    const auto& py = compiled::getPyCompilerInterface();
    const std::string fn = py->bind_function(saved.get_py_compiler(), name(), &functional_backward, schema,
                                             /*is_custom_function=*/true, /*is_traceable=*/true);
    variable_list result = py->call_function(
        saved.get_py_compiler(), "apply_functional", fn, grads, args,
        compiled::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            compiled::get_input_metadata(next_edges())));
    for (SavedVariable* v : {&input, &weight, &bias, &mean, &rstd}) saved.after(*v);
    saved.after(normalized_shape);
    return result;
  }

  static variable_list functional_backward(const variable_list& grads, const std::vector<c10::IValue>& args) {
    torch::dynamo::autograd::PackedArgs packed(args);
    std::array<at::Tensor, 5> t;  // input, weight, bias, mean, rstd
    for (auto& value : t) value = packed.unpack<std::optional<at::Tensor>>().value_or(at::Tensor());
    const auto shape = packed.unpack<std::vector<c10::SymInt>>();
    const auto wanted = packed.unpack<std::vector<bool>>();
    if (!grads[0].defined()) return {{}, {}, {}};
    return backward(grads[0], t[0], t[1], t[2], t[3], t[4], shape, {wanted[0], wanted[1], wanted[2]});
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
