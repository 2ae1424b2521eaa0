#pragma once
// Internal pieces of the BatchNorm ops. The input is always the folded [N, C, ...] tensor,
// N = G * M: statistics are per (group, channel), over the M rows of a group and every spatial
// position. G = 1 normalises over T, B and space together; G = T is the per-time-step option.
//
// Building-block ops (one kernel file per dispatch key, so CUDA kernels slot in beside the CPU ones):
//   batch_norm_stats(x, G)                           -> mean [G, C], biased var [G, C]
//   batch_norm_elemt(x, mean, var, w, b, eps, G)     -> (x - mean) / sqrt(var + eps) * w + b
//   batch_norm_backward_reduce(dy, x, mean, G)       -> sum(dy), sum(dy * (x - mean)) [G, C]
//   batch_norm_backward_elemt(dy, x, mean, var, w, sum_dy, sum_dy_xmu, eps, count, G) -> dx
//   batch_norm_update_stats(mean, var, count, running_mean, running_var, num_batches_tracked, momentum)
// The per-channel constants are computed inside the kernels: a call is a handful of ops, not dozens.
// the differentiable batch_norm_normalize (statistics + affine, autograd in C++), and the layer op
// batch_norm = checks + fold + batch_norm_normalize + batch_norm_update_stats.
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace matterhorn::ops::detail {

// Conversions that call no op when nothing changes: a kernel below autograd must not hand back
// its input as a new result (aten::to and aten::contiguous would return it as is).
inline at::Tensor cast(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}
inline at::Tensor dense(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// Count, mean and sum of squared deviations, merged with Chan's formula (numerically safe);
// shared by the CPU and CUDA kernels. The count is an integer so that it stays exact at any size
// (a float count stops growing at 2^24). No values: mean and variance are NaN, as torch.var_mean's.
template <typename acc_t>
struct Moments {
  int64_t count = 0;
  acc_t mean = 0, m2 = 0;
  C10_HOST_DEVICE void merge(int64_t n, acc_t other_mean, acc_t other_m2) {
    if (n == 0) return;
    const int64_t total = count + n;
    const acc_t share = static_cast<acc_t>(n) / static_cast<acc_t>(total);
    const acc_t delta = other_mean - mean;
    mean += delta * share;
    m2 += other_m2 + delta * delta * static_cast<acc_t>(count) * share;
    count = total;
  }
  C10_HOST_DEVICE void merge(const Moments& other) { merge(other.count, other.mean, other.m2); }
  // mean and biased variance of (group, channel) `at`
  C10_HOST_DEVICE void write(acc_t* means, acc_t* vars, int64_t at) const {
    const acc_t none = std::numeric_limits<acc_t>::quiet_NaN();
    means[at] = count > 0 ? mean : none;
    vars[at] = count > 0 ? m2 / static_cast<acc_t>(count) : none;
  }
};

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
    const std::optional<at::Tensor>& bias, double eps, int64_t groups);
void check_backward_reduce_arguments(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups);
void check_backward_elemt_arguments(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    const c10::SymInt& count, int64_t groups);
// Statistics [G, C] beside running statistics [C] on one device; num_batches_tracked one int64;
// count >= 0 and not 1 (the unbiased variance of one value is undefined).
void check_update_stats_arguments(
    const at::Tensor& mean, const at::Tensor& var, const c10::SymInt& count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked);

// Forward of batch_norm_normalize on the folded tensor: (y, mean [G, C], biased var [G, C]) of the
// batch; with batch_statistics false the running statistics are used and mean and var are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool batch_statistics, double eps, int64_t groups);

// Backward of batch_norm_normalize on the folded tensors: (grad_input, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, bool batch_statistics, double eps, int64_t groups,
    std::array<bool, 3> needs);

// [T, B, C, ...] -> [T*B, C, ...] when multi-step, else the input; and back.
at::Tensor fold_time(const at::Tensor& input, bool multi_step);
at::Tensor unfold_time(const at::Tensor& output, const at::Tensor& input, bool multi_step);

}  // namespace matterhorn::ops::detail
