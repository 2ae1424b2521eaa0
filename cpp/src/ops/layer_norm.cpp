// matterhorn::layer_norm: LayerNorm over the trailing normalized_shape of [T, B, ..., *shape] or
// [B, ..., *shape]. Checks in the user's terms, then ATen's layer norm (measured within a few
// percent of the fold: it already treats all leading dimensions as one batch). A composite, so
// ATen's CPU, CUDA, Meta and autograd kernels serve every key.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/layer_norm.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "matterhorn/ops/layer_norm.h"
#include "ops/checks.h"

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
      detail::check_same_dtype_and_device("LayerNorm", input, *param, name);
    }
  }
}

at::Tensor layer_norm_composite(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_layer_norm_arguments(input, normalized_shape, weight, bias);
  return at::layer_norm_symint(input, normalized_shape, weight, bias, eps);
}

}  // namespace

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
}

TORCH_LIBRARY_IMPL(matterhorn, CompositeImplicitAutograd, m) {
  m.impl("layer_norm", &matterhorn::ops::layer_norm_composite);
}
