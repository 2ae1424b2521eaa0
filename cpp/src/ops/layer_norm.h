#pragma once
// Internal pieces of the LayerNorm ops. The input is viewed as rows: [N, D], D = the product of
// normalized_shape, N = every leading size (T, B, tokens, ...) together.
//
// Building-block ops (one kernel file per dispatch key, like BatchNorm's):
//   layer_norm_normalize(x, shape, w, b, eps)       -> y, mean [N...], rstd [N...] (differentiable)
//   layer_norm_backward(dy, x, shape, mean, rstd, w) -> dx, dw, db (dw, db: [0] without weight)
// The layer op layer_norm = checks in the user's terms + layer_norm_normalize.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace matterhorn::ops::detail {

// Checks shared by the building-block ops' kernels (they are also public ops): input [..., *shape],
// every normalized size >= 1, weight and bias absent or of normalized_shape and the input's dtype.
void check_layer_norm_block(
    const char* op, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias = std::nullopt);

// layer_norm_backward's checks: the block's, statistics of the leading shape in the accumulation
// type, grad_output like the input.
void check_layer_norm_backward_block(
    const at::Tensor& grad_output, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight);

// The building blocks through the dispatcher (below autograd when the caller excludes it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_normalize(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_output, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight);

// The leading sizes of input (its statistics' shape).
inline c10::SymIntArrayRef statistics_shape(const at::Tensor& input, c10::SymIntArrayRef normalized_shape) {
  return input.sym_sizes().slice(0, input.dim() - static_cast<int64_t>(normalized_shape.size()));
}

}  // namespace matterhorn::ops::detail
