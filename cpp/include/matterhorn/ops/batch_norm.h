#pragma once
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/macros/Export.h>

namespace matterhorn::ops {

// The BatchNorm core on a folded input [N, C, ...]: N is `groups` contiguous groups of rows;
// statistics per (group, channel) over the group's rows and every spatial position (groups 1:
// over everything). weight, bias, running_mean and running_var are [C] (shared by the groups) or
// [groups, C]; `scale` ([S], groups 1 or S) multiplies each of S contiguous row groups' output.
// In training the running statistics, when given, are updated as torch.nn does: [C] ones once per
// group in order, [groups, C] ones row by row; momentum nullopt is the cumulative average.
// Calls the dispatcher op matterhorn::batch_norm.
C10_EXPORT at::Tensor batch_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, int64_t groups = 1, const std::optional<at::Tensor>& scale = std::nullopt);

// A BatchNorm layer (`layer`: its class name, ending in 1d/2d/3d, named in messages) over
// [T, B, C, ...] ([B, T, C, ...] with batch_first) or one step [B, C, ...] (the rank tells, except
// BatchNorm1d's 3-D input: [T, B, C] in multi_step_mode, else [B, C, L]): folds the input and
// chooses the groups (per time step with per_step in training, or with per-step weight / running
// statistics; one with a per-step scale), then calls the core. Calls matterhorn::batch_norm_layer.
C10_EXPORT at::Tensor batch_norm_layer(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, const std::string& layer, int64_t num_features, bool multi_step_mode, bool per_step = false,
    bool batch_first = false, const std::optional<at::Tensor>& scale = std::nullopt);

}  // namespace matterhorn::ops
