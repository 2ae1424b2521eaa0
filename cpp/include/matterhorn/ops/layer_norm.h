#pragma once
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/macros/Export.h>

namespace matterhorn::ops {

// LayerNorm over the trailing `normalized_shape` of [T, B, ..., *normalized_shape] (or
// [B, ..., *normalized_shape]); the same in both modes. Calls matterhorn::layer_norm.
C10_EXPORT at::Tensor layer_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight = std::nullopt,
    const std::optional<at::Tensor>& bias = std::nullopt, double eps = 1e-5);

}  // namespace matterhorn::ops
