#pragma once
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/macros/Export.h>

namespace matterhorn::ops {

// BatchNorm{dims}d over [T, B, C, ...] ([B, T, C, ...] with batch_first) or one step [B, C, ...]
// (the rank tells, except BatchNorm1d's 3-D input: [T, B, C] in multi_step_mode, else [B, C, L]).
// Statistics per channel over T, B and every spatial position (per_step: over B and space for
// each t, affine shared). In training the running statistics, when given, are updated as torch.nn
// does (once per call, or once per time step with per_step); momentum nullopt is the cumulative
// average. Calls the dispatcher op matterhorn::batch_norm.
C10_EXPORT at::Tensor batch_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, int64_t num_features, int64_t dims, bool multi_step_mode, bool per_step = false,
    bool batch_first = false);

}  // namespace matterhorn::ops
