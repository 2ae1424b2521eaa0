// matterhorn::layer_norm: LayerNorm over the trailing normalized_shape of [T, B, ..., *shape] or
// [B, ..., *shape]. Checks in the user's terms, then matterhorn::layer_norm_normalize on the rows
// (all leading dimensions are one batch of rows: no fold needed). Schemas of the building blocks
// and their shared checks live here too (see ops/layer_norm.h).
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "matterhorn/ops/layer_norm.h"
#include "ops/checks.h"
#include "ops/layer_norm.h"

namespace matterhorn::ops {
namespace {

// "28, 28" for [28, 28]; only in messages, so built only when a check fails.
std::string trailing_sizes(c10::SymIntArrayRef normalized_shape) {
  const std::string shape = c10::str(normalized_shape);
  return shape.substr(1, shape.size() - 2);
}

void check_layer_norm_arguments(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  const auto dims = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()), "LayerNorm: expected a floating-point input, got ",
      detail::dtype_name(input.scalar_type()));
  bool matches = input.dim() >= dims + 1;
  for (const auto d : c10::irange(dims)) {
    matches = matches && input.sym_size(input.dim() - dims + d) == normalized_shape[d];
  }
  TORCH_CHECK_VALUE(
      matches, "LayerNorm(normalized_shape=", normalized_shape, "): expected input [T, B, ..., ",
      trailing_sizes(normalized_shape), "] in multi-step mode or [B, ..., ", trailing_sizes(normalized_shape),
      "] in single-step mode; got ", input.sym_sizes());
  for (const auto& [param, name] : {std::pair{weight, "weight"}, std::pair{bias, "bias"}}) {
    if (param.has_value() && param->defined()) {
      detail::check_norm_parameter_dtype_and_device("LayerNorm", input, *param, name);
    }
  }
}

at::Tensor layer_norm_composite(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_layer_norm_arguments(input, normalized_shape, weight, bias);
  return std::get<0>(detail::call_normalize(input, normalized_shape, weight, bias, eps));
}

}  // namespace

namespace detail {

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_normalize(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::layer_norm_normalize", "")
                             .typed<decltype(call_normalize)>();
  return op.call(input, normalized_shape, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_output, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::layer_norm_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_output, input, normalized_shape, mean, rstd, weight);
}

void check_layer_norm_block(
    const char* op, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const auto dims = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()), op, ": expected a floating-point input, got ",
      dtype_name(input.scalar_type()));
  TORCH_CHECK_VALUE(
      dims >= 1 && input.dim() >= dims, op, ": expected an input [..., ", trailing_sizes(normalized_shape),
      "], got ", input.sym_sizes());
  for (const auto d : c10::irange(dims)) {
    TORCH_CHECK_VALUE(
        input.sym_size(input.dim() - dims + d) == normalized_shape[d], op, ": expected an input [..., ",
        trailing_sizes(normalized_shape), "], got ", input.sym_sizes());
  }
  for (const auto& [param, name] : {std::pair{weight, "weight"}, std::pair{bias, "bias"}}) {
    if (param.has_value() && param->defined()) {
      TORCH_CHECK_VALUE(
          param->sym_sizes() == normalized_shape, op, ": expected ", name, " of shape ", normalized_shape, ", got ",
          param->sym_sizes());
      check_norm_parameter_dtype_and_device(op, input, *param, name);
    }
  }
  const bool both = weight.has_value() && weight->defined() && bias.has_value() && bias->defined();
  TORCH_CHECK_TYPE(
      !both || weight->scalar_type() == bias->scalar_type(), op, ": weight and bias must share a dtype, got ",
      dtype_name(weight->scalar_type()), " and ", dtype_name(bias->scalar_type()));
}

void check_layer_norm_backward_block(
    const at::Tensor& grad_output, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight) {
  check_layer_norm_block("layer_norm_backward", input, normalized_shape, weight);
  const auto stats_shape = statistics_shape(input, normalized_shape);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  for (const auto& [stat, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK_VALUE(
        stat->sym_sizes() == stats_shape && stat->scalar_type() == acc_type, "layer_norm_backward: expected ",
        name, " of shape ", stats_shape, " and dtype ", acc_type, ", got ", stat->sym_sizes(), " ",
        stat->scalar_type());
  }
  TORCH_CHECK_VALUE(
      grad_output.sym_sizes() == input.sym_sizes() && grad_output.scalar_type() == input.scalar_type(),
      "layer_norm_backward: grad_output must match the input's shape and dtype");
  for (const auto& [t, name] : {std::pair{&grad_output, "grad_output"}, {&mean, "mean"}, {&rstd, "rstd"}}) {
    TORCH_CHECK_VALUE(
        t->device() == input.device(), "layer_norm_backward: ", name, " is on ", t->device(), " but the input is on ",
        input.device());
  }
}

}  // namespace detail

at::Tensor layer_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::layer_norm", "")
                             .typed<decltype(layer_norm_composite)>();
  return op.call(input, c10::fromIntArrayRefSlow(normalized_shape), weight, bias, eps);
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def("layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, Tensor? bias=None, float eps=1e-05) -> Tensor");
  m.def(
      "layer_norm_normalize(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor output, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor input, SymInt[] normalized_shape, Tensor mean, Tensor rstd, "
      "Tensor? weight) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(matterhorn, CompositeImplicitAutograd, m) {
  m.impl("layer_norm", &matterhorn::ops::layer_norm_composite);
}

// A building block without a derivative (layer_norm_normalize has one): a backward through it
// raises, where torch's default would warn and give no gradient.
TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("layer_norm_backward", torch::autograd::autogradNotImplementedFallback());
}
