#pragma once
// Internal pieces of the BatchNorm ops. The input is always the folded [N, C, ...] tensor,
// N = G * M: G contiguous groups of M rows along N. What the rows are (T*B, B*T, B) and what G
// is (1: statistics over everything, T: per time step) the layer decides (ops/batch_norm_layer.cpp).
//
// Per-(group, channel) values -- statistics, running statistics, weight, bias -- are [G, C] (one
// row per group) or [C] / [1, C] (shared by every group); `scale` is [G] (one factor per group).
// Building-block ops (one kernel file per dispatch key, so CUDA kernels slot in beside the CPU ones):
//   batch_norm_stats(x, G)                           -> mean [G, C], biased var [G, C]
//   batch_norm_elemt(x, mean, var, w, b, eps, G, scale) -> ((x - mean) / sqrt(var + eps) * w + b) * scale
//   batch_norm_backward_reduce(dy, x, mean, G)       -> sum(dy), sum(dy * (x - mean)) [G, C]
//   batch_norm_backward_elemt(dy, x, mean, var, w, sum_dy, sum_dy_xmu, eps, count, G, scale) -> dx
//     (sum_dy, sum_dy_xmu: of dy * scale, per statistics group)
//   batch_norm_update_stats(mean, var, count, running_mean, running_var, num_batches_tracked, momentum)
//     (running statistics [C]: updated once per group in order; [G, C]: row g from group g)
// The per-channel constants are computed inside the kernels: a call is a handful of ops, not dozens.
// the differentiable batch_norm_normalize (statistics + affine + scale, autograd in C++), and the
// core op batch_norm = checks + batch_norm_normalize + batch_norm_update_stats.
#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "ops/norm_common.h"

namespace matterhorn::ops::detail {

// Dense with the channels innermost in memory ([N, *spatial, C]): channels_last and its 1-D/3-D kin.
inline bool channels_innermost(const at::Tensor& t) {
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return t.dim() == 3 && t.stride(1) == 1 && t.stride(2) == t.size(1) && t.stride(0) == t.size(1) * t.size(2);
}

// How a kernel walks the folded input: [G, M, C, S] (NCS, contiguous) or [G, M*S, C] (NSC:
// channels_last, or no spatial size at all).
struct BatchNormLayout {
  int64_t groups = 1;
  int64_t channels = 0;
  int64_t rows = 0;   // per group: M for NCS, M * S for NSC
  int64_t inner = 1;  // S for NCS, 1 for NSC
  bool channels_last = false;
  int64_t count() const { return rows * inner; }  // values per (group, channel)
};

// A second tensor (dy) in the layout the input is walked in (no copy when it already is).
inline at::Tensor like_layout(const at::Tensor& t, const BatchNormLayout& layout) {
  const bool spatial = t.numel() != t.size(0) * t.size(1);
  if (!layout.channels_last || !spatial) return dense(t);
  return channels_innermost(t) ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
}

// The layout of `input` (the folded [N, C, ...] tensor) and the tensor to walk: the input itself
// when contiguous or channels_last, else a contiguous copy.
std::tuple<at::Tensor, BatchNormLayout> batch_norm_layout(const at::Tensor& input, int64_t groups);

// Argument checks of the building-block ops (they are public ops), shared by their CPU, CUDA and
// Meta kernels so that every device refuses the same inputs: a floating-point input [N, C, ...],
// groups dividing N, statistics of groups x C values, parameters of C values, grad_output like
// the input, everything on the input's device, eps >= 0.
void check_stats_arguments(const at::Tensor& input, int64_t groups);
void check_elemt_arguments(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t groups, const std::optional<at::Tensor>& scale);
void check_backward_reduce_arguments(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups);
void check_backward_elemt_arguments(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    const c10::SymInt& count, int64_t groups, const std::optional<at::Tensor>& scale);
// Statistics [G, C] beside running statistics [C] or [G, C] on one device; num_batches_tracked one int64;
// count >= 0 and not 1 (the unbiased variance of one value is undefined).
void check_update_stats_arguments(
    const at::Tensor& mean, const at::Tensor& var, const c10::SymInt& count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked);

// The building blocks through the dispatcher, so each device's kernel runs (below autograd when
// the caller excludes it), as LayerNorm's (ops/layer_norm.h).
std::tuple<at::Tensor, at::Tensor> call_stats(const at::Tensor& input, int64_t groups);
at::Tensor call_elemt(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t groups,
    const std::optional<at::Tensor>& scale = std::nullopt);
std::tuple<at::Tensor, at::Tensor> call_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups);
at::Tensor call_backward_elemt(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    const c10::SymInt& count, int64_t groups, const std::optional<at::Tensor>& scale);
// batch_norm_normalize: the output; mean and var set to its other two results.
at::Tensor call_normalize_first(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups, const std::optional<at::Tensor>& scale, at::Tensor& mean,
    at::Tensor& var);
void call_update_stats(
    const at::Tensor& mean, const at::Tensor& var, const c10::SymInt& count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum);

// group index -> offset of the group's row in a per-(group, channel) tensor: C, or 0 when shared.
inline int64_t group_stride(const at::Tensor& t, int64_t channels) {
  return t.defined() && t.numel() != channels ? channels : 0;
}

// Forward of batch_norm_normalize on the folded tensor: (y, mean [G, C], biased var [G, C]) of the
// batch; with batch_statistics false the running statistics are used and mean and var are empty.
// With a scale [S] (groups 1 or S) the element pass runs per scale group.
std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool batch_statistics, double eps, int64_t groups,
    const std::optional<at::Tensor>& scale);

// Backward of batch_norm_normalize on the folded tensors, mean and var 2-D ([G, C] or [1, C]):
// (grad_input, grad_weight, grad_bias, grad_scale) for the `needs` among them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> normalize_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, bool batch_statistics,
    double eps, int64_t groups, const std::optional<at::Tensor>& scale, std::array<bool, 4> needs);

// Who the core's messages name: the layer ("BatchNorm2d") with its input's shape and " and time
// step" for per-step statistics, or the op itself.
struct NormCaller {
  c10::string_view name;
  const char* per_group;
  c10::SymIntArrayRef shape;
};

// The core op matterhorn::batch_norm on the folded input (checks, normalize, update the running
// statistics), its messages naming `who`. groups 0 only for an empty input: no statistics update.
at::Tensor batch_norm_folded(
    const NormCaller& who, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, int64_t groups, const std::optional<at::Tensor>& scale);

// The layer's fold (ops/batch_norm_layer.cpp): its input as the core's [N, C, ...] and groups.
struct BatchNormFold {
  at::Tensor folded;
  int64_t groups = 1;
  bool multi_step = false, time_major = true;
  c10::SymInt steps = 1, batch = 0;  // T and B of a multi-step input
};

// Checks the input in the layer's terms (rank, channels, T against per-step tensors) and folds it.
BatchNormFold fold_for_batch_norm(
    const at::Tensor& input, c10::string_view layer, int64_t num_features, bool multi_step_mode, bool per_step,
    bool batch_first, bool batch_statistics, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& scale);
at::Tensor unfold_from_batch_norm(const at::Tensor& output, const BatchNormFold& fold);

}  // namespace matterhorn::ops::detail
