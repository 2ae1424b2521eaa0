#pragma once
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/macros/Export.h>

namespace matterhorn::ops {

// Time-folded linear layer: input [T, B, ..., I] (or [B, ..., I], or [I]), weight [O, I],
// bias [O] -> [T, B, ..., O], computed as one GEMM over all leading positions.
// Calls the dispatcher op matterhorn::linear, so it is differentiable and runs on any device
// the library was built for.
C10_EXPORT at::Tensor linear(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace matterhorn::ops
