// Autograd kernel of matterhorn::batch_norm_normalize: forward with the statistics kernels, backward
// with one reduction pass and one element pass (matterhorn::batch_norm_backward_reduce / _elemt).
// The backward is a hand-written autograd node, as torch's generated ones are: the generic
// torch::autograd::Function costs about 12 us more per step (its context, output wrapping).
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/var_mean.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include "ops/autograd/node.h"
#include "ops/batch_norm.h"

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The normalization in differentiable ATen ops, for what our kernels have no formulas for
// (forward-mode AD, a backward with create_graph=True), as LayerNorm uses ATen's layer norm there.
// The folded input as [groups, rows, C, values]; statistics and parameters [C] or [groups, C].
at::Tensor grouped(const at::Tensor& input, int64_t groups) {
  c10::SymInt values = 1;
  for (int64_t d = 2; d < input.dim(); ++d) values = values * input.sym_size(d);
  return input.reshape_symint({groups, input.sym_size(0) / groups, input.sym_size(1), values});
}

at::Tensor per_group(const at::Tensor& t) {  // [C] or [G, C] -> [1 or G, 1, C, 1]
  return t.dim() == 1 ? t.view_symint({1, 1, t.sym_size(0), 1}) : t.unsqueeze(1).unsqueeze(3);
}

// Batch statistics [G, C] of the folded input, differentiable.
std::tuple<at::Tensor, at::Tensor> composite_statistics(const at::Tensor& input, int64_t groups) {
  auto [var, mean] = at::var_mean(grouped(input.to(at::toOpMathType(input.scalar_type())), groups),
                                  at::IntArrayRef{1, 3}, /*correction=*/0, /*keepdim=*/false);
  return {mean, var};
}

at::Tensor composite_normalize(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& var, double eps, int64_t steps, const at::Tensor& scale) {
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor y = (grouped(input.to(acc), steps) - per_group(mean.to(acc))) * (per_group(var.to(acc)) + eps).rsqrt();
  if (weight.defined()) y = y * per_group(weight.to(acc));
  if (bias.defined()) y = y + per_group(bias.to(acc));
  if (scale.defined()) y = y * scale.to(acc).view_symint({scale.sym_size(0), 1, 1, 1});
  return y.to(input.scalar_type()).reshape_symint(input.sym_sizes());
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// Edges to the gradients of (input, weight, bias, scale); the statistics are not differentiable.
struct BatchNormNormalizeBackward final : torch::autograd::Node {
  SavedVariable input, weight, bias, scale, mean, var;  // without batch statistics: the running ones
  bool scaled = false;
  bool batch_statistics = true;
  double eps = 0;
  int64_t groups = 1;

  std::string name() const override { return "BatchNormNormalizeBackward"; }
  variable_list differentiable_backward(const at::Tensor& grad, std::array<bool, 4> needs);

  // Compiled autograd (torch.compile of a backward): the node's constants key the cache, and its
  // backward is traced as a function of the saved tensors (our ops have Meta kernels).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&input, &weight, &bias, &scale, &mean, &var}) args.collect(*v, false);
    args.collect(batch_statistics);
    args.collect(scaled);
    args.collect(eps);
    args.collect(groups);
  }

  variable_list apply_with_saved(
      const variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) override {
    namespace compiled = torch::dynamo::autograd;
    for (SavedVariable* v : {&input, &weight, &bias, &scale, &mean, &var}) saved.before(*v);
    compiled::PackedArgs packed;
    for (const SavedVariable* v : {&input, &weight, &bias, &scale, &mean, &var}) {
      packed.pack(matterhorn::ops::detail::defined_or_none(v->unpack()));
    }
    packed.pack(std::vector<bool>{task_should_compute_output(0), task_should_compute_output(1),
                                  task_should_compute_output(2), scaled && task_should_compute_output(3)});
    packed.pack(batch_statistics);
    packed.pack(eps);
    packed.pack(groups);
    const std::vector<c10::IValue>& args = packed.vec();
    std::vector<at::TypePtr> schema;
    for (const c10::IValue& value : args) schema.push_back(value.isTensor() ? at::TensorType::get() : value.type());
    const auto& py = compiled::getPyCompilerInterface();
    // bound per call under a fresh name (is_custom_function), as torch's C++ Functions are: the
    // schema changes with which optional tensors are present
    const std::string fn = py->bind_function(saved.get_py_compiler(), name(), &functional_backward, schema,
                                             /*is_custom_function=*/true, /*is_traceable=*/true);
    variable_list result = py->call_function(
        saved.get_py_compiler(), "apply_functional", fn, grads, args,
        compiled::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            compiled::get_input_metadata(next_edges())));
    for (SavedVariable* v : {&input, &weight, &bias, &scale, &mean, &var}) saved.after(*v);
    return result;
  }

  // apply's work on unpacked values: what compiled autograd traces.
  static variable_list functional_backward(const variable_list& grads, const std::vector<c10::IValue>& args) {
    torch::dynamo::autograd::PackedArgs packed(args);
    std::array<std::optional<at::Tensor>, 6> t;  // input, weight, bias, scale, mean, var
    for (auto& value : t) value = packed.unpack<std::optional<at::Tensor>>();
    const auto wanted = packed.unpack<std::vector<bool>>();
    const auto batch_statistics = packed.unpack<bool>();
    const auto eps = packed.unpack<double>();
    const auto groups = packed.unpack<int64_t>();
    if (!grads[0].defined()) return {{}, {}, {}, {}};
    const auto rows = [](const at::Tensor& s) { return s.dim() == 1 ? s.unsqueeze(0) : s; };
    auto [grad_input, grad_weight, grad_bias, grad_scale] = matterhorn::ops::detail::normalize_backward(
        grads[0], *t[0], t[1], t[2], rows(*t[4]), rows(*t[5]), batch_statistics, eps, groups, t[3],
        {wanted[0], wanted[1], wanted[2], wanted[3]});
    return {grad_input, grad_weight, grad_bias, grad_scale};
  }

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
    const std::array<bool, 4> needs{
        task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2),
        scaled && task_should_compute_output(3)};
    if (!grads[0].defined()) return {{}, {}, {}, {}};  // the output was not used
    const auto statistic = [&](const SavedVariable& s) {  // [G, C] or [1, C]
      const at::Tensor t = s.unpack();
      return t.dim() == 1 ? t.unsqueeze(0) : t;
    };
    const auto optional = [](const SavedVariable& s) { return matterhorn::ops::detail::defined_or_none(s.unpack()); };
    if (at::GradMode::is_enabled()) return differentiable_backward(grads[0], needs);
    at::AutoDispatchBelowADInplaceOrView guard;  // no graph is recorded here: skip autograd's layers
    auto [grad_input, grad_weight, grad_bias, grad_scale] = matterhorn::ops::detail::normalize_backward(
        grads[0], input.unpack(), optional(weight), optional(bias), statistic(mean), statistic(var),
        batch_statistics, eps, groups, optional(scale), needs);
    return {grad_input, grad_weight, grad_bias, grad_scale};
  }
};

// create_graph=True (torch.func's grad and vjp always ask for it): the backward's formula in ATen
// ops on the saved tensors, with batch statistics recomputed from the input, so that torch
// differentiates it again. A formula, not torch::autograd::grad of a recomputed forward: under
// torch.func the saved tensors belong to a finished transform and record no graph of their own.
variable_list BatchNormNormalizeBackward::differentiable_backward(const at::Tensor& grad, std::array<bool, 4> needs) {
  const at::Tensor x = input.unpack(), w = weight.unpack(), b = bias.unpack(), s = scale.unpack();
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t steps = scaled ? s.size(0) : groups;
  at::Tensor m = mean.unpack(), v = var.unpack();
  if (batch_statistics) std::tie(m, v) = composite_statistics(x, groups);
  m = m.to(acc), v = v.to(acc);  // running statistics may be half precision, as the kernels' are read
  // [steps, rows, C, values]; the statistics reduce over every step when one group spans them (TEBN)
  const at::Tensor xg = grouped(x.to(acc), steps), dy = grouped(grad.to(acc), steps);
  const std::vector<int64_t> statistics_dims = groups == steps ? std::vector<int64_t>{1, 3} : std::vector<int64_t>{0, 1, 3};
  const at::Tensor rstd = (per_group(v) + eps).rsqrt();
  const at::Tensor xhat = (xg - per_group(m)) * rstd;
  const at::Tensor dy_affine = scaled ? dy * s.to(acc).view({steps, 1, 1, 1}) : dy;  // d(loss)/d(xhat * w + b)
  const auto to_parameter = [](const at::Tensor& per_step, const at::Tensor& param) {  // [steps, C] -> its shape
    return (param.dim() == 1 ? per_step.sum(0) : per_step).to(param.scalar_type());
  };
  variable_list grads(4);
  if (needs[0]) {
    const at::Tensor g = w.defined() ? dy_affine * per_group(w.to(acc)) : dy_affine;
    at::Tensor dx = g * rstd;
    if (batch_statistics) {
      dx = rstd * (g - g.mean(at::IntArrayRef(statistics_dims), /*keepdim=*/true) -
                   xhat * (g * xhat).mean(at::IntArrayRef(statistics_dims), /*keepdim=*/true));
    }
    grads[0] = dx.to(x.scalar_type()).reshape_symint(x.sym_sizes());
  }
  if (needs[1] && w.defined()) grads[1] = to_parameter((dy_affine * xhat).sum({1, 3}), w);
  if (needs[2] && b.defined()) grads[2] = to_parameter(dy_affine.sum({1, 3}), b);
  if (needs[3] && scaled) {
    at::Tensor affine = w.defined() ? xhat * per_group(w.to(acc)) : xhat;
    if (b.defined()) affine = affine + per_group(b.to(acc));
    grads[3] = (dy * affine).sum({1, 2, 3}).to(s.scalar_type());
  }
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_normalize_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  if (torch::autograd::isFwGradDefined(input) || torch::autograd::isFwGradDefined(weight) ||
      torch::autograd::isFwGradDefined(bias) || torch::autograd::isFwGradDefined(scale)) {
    // forward-mode AD: the ATen composition, which torch has formulas for
    const int64_t steps = scale.has_value() && scale->defined() ? scale->size(0) : groups;
    at::Tensor mean, var;
    if (batch_statistics) {
      std::tie(mean, var) = composite_statistics(input, groups);
    } else {
      mean = *running_mean, var = *running_var;
    }
    at::Tensor output = composite_normalize(
        input, or_undefined(weight), or_undefined(bias), mean, var, eps, steps, or_undefined(scale));
    if (!batch_statistics) {
      const auto none = at::empty({0}, input.options().dtype(at::toOpMathType(input.scalar_type())));
      return {output, none, none.clone()};
    }
    return {output, mean.detach(), var.detach()};  // the running statistics' update takes no tangent
  }
  const bool record = torch::autograd::compute_requires_grad(input, weight, bias, scale);  // false in no_grad
  at::Tensor output, mean, var;
  {
    // this op again below autograd (not its kernels directly): under nested torch.func transforms
    // the outer one sees batch_norm_normalize, and records this node for it too
    at::AutoDispatchBelowADInplaceOrView guard;
    output = matterhorn::ops::detail::call_normalize_first(
        input, weight, bias, running_mean, running_var, batch_statistics, eps, groups, scale, mean, var);
  }
  if (record) {
    auto node = matterhorn::ops::detail::make_node<BatchNormNormalizeBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, scale));
    node->input = SavedVariable(input, false);
    node->weight = SavedVariable(weight, false);
    node->scaled = scale.has_value() && scale->defined();
    node->bias = SavedVariable(bias, false);
    if (node->scaled) node->scale = SavedVariable(*scale, false);
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
