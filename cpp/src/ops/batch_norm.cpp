// BatchNorm: schemas, argument checks in the user's terms, and the device-generic compositions
// (the per-element work is in the building-block kernels: ops/cpu/batch_norm_kernel.cpp, ...).
#include "ops/batch_norm.h"

#include <cmath>

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "matterhorn/ops/batch_norm.h"
#include "ops/checks.h"

namespace matterhorn::ops {
namespace detail {
namespace {

// The building blocks, called through the dispatcher so each device's kernel runs.
std::tuple<at::Tensor, at::Tensor> call_stats(const at::Tensor& input, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::batch_norm_stats", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return op.call(input, groups);
}

at::Tensor call_elemt(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t groups) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm_elemt", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double, int64_t)>();
  return op.call(input, mean, var, weight, bias, eps, groups);
}

std::tuple<at::Tensor, at::Tensor> call_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm_backward_reduce", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(grad_output, input, mean, groups);
}

at::Tensor call_backward_elemt(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    const c10::SymInt& count, int64_t groups) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm_backward_elemt", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, c10::SymInt,
                            int64_t)>();
  return op.call(grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, eps, count, groups);
}

at::Tensor call_normalize_first(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups, at::Tensor& mean, at::Tensor& var) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm_normalize", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double, int64_t)>();
  at::Tensor output;
  std::tie(output, mean, var) = op.call(input, weight, bias, running_mean, running_var, batch_statistics, eps, groups);
  return output;
}

void call_update_stats(
    const at::Tensor& mean, const at::Tensor& var, const c10::SymInt& count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm_update_stats", "")
          .typed<void(const at::Tensor&, const at::Tensor&, c10::SymInt, const at::Tensor&, const at::Tensor&,
                      const std::optional<at::Tensor>&, std::optional<double>)>();
  op.call(mean, var, count, running_mean, running_var, num_batches_tracked, momentum);
}

// The page's names: [L] (optional for BatchNorm1d), [H, W], [H, W, L].
std::string accepted_shapes(int64_t dims) {
  switch (dims) {
    case 1: return "[T, B, C] or [T, B, C, L] in multi-step mode, [B, C] or [B, C, L] in single-step mode";
    case 2: return "[T, B, C, H, W] in multi-step mode or [B, C, H, W] in single-step mode";
    default: return "[T, B, C, H, W, L] in multi-step mode or [B, C, H, W, L] in single-step mode";
  }
}

// The rank tells single- from multi-step, except BatchNorm1d's 3-D input, which the mode decides.
bool input_is_multi_step(int64_t rank, int64_t dims, bool multi_step_mode) {
  return dims == 1 ? rank == 4 || (rank == 3 && multi_step_mode) : rank == dims + 3;
}

bool rank_accepted(int64_t rank, int64_t dims, bool multi_step) {
  const int64_t leading = multi_step ? 2 : 1;
  return dims == 1 ? (rank == leading + 1 || rank == leading + 2) : rank == leading + 1 + dims;
}

// A parameter or running statistic: the input's dtype, or float32 beside a reduced-precision input.
void check_parameter(const LayerName& layer, const at::Tensor& input, const std::optional<at::Tensor>& param,
                     const char* name, int64_t num_features) {
  if (!param.has_value() || !param->defined()) return;
  TORCH_CHECK_VALUE(
      param->dim() == 1 && param->sym_size(0) == num_features, layer, ": ", name, " must be [num_features] = [",
      num_features, "], got ", param->sym_sizes());
  check_norm_parameter_dtype_and_device(layer, input, *param, name);
}

void check_batch_norm_arguments(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, double eps, int64_t num_features,
    int64_t dims, bool multi_step, bool per_step, bool batch_first) {
  TORCH_CHECK_VALUE(dims >= 1 && dims <= 3, "batch_norm: dims must be 1, 2 or 3, got ", dims);
  const LayerName layer{"BatchNorm", dims};
  TORCH_CHECK_VALUE(
      rank_accepted(input.dim(), dims, multi_step), layer, ": expected input ", accepted_shapes(dims), "; got a ",
      input.dim(), "-D tensor ",
      input.sym_sizes());
  const int64_t channel_dim = multi_step ? 2 : 1;
  TORCH_CHECK_VALUE(
      input.sym_size(channel_dim) == num_features, layer, "(num_features=", num_features, "): expected ",
      num_features, " channels at dimension ", channel_dim, " (C in ", accepted_shapes(dims), "); got ",
      input.sym_sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()), layer, ": expected a floating-point input, got ",
      dtype_name(input.scalar_type()));
  check_parameter(layer, input, weight, "weight", num_features);
  check_parameter(layer, input, bias, "bias", num_features);
  check_parameter(layer, input, running_mean, "running_mean", num_features);
  check_parameter(layer, input, running_var, "running_var", num_features);
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    TORCH_CHECK_VALUE(
        num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->sym_numel() == 1, layer,
        ": num_batches_tracked must be a single torch.int64 value, got ",
        dtype_name(num_batches_tracked->scalar_type()), " ", num_batches_tracked->sym_sizes());
  }
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(
      has_mean == has_var, layer, ": running_mean and running_var must both be tensors or both be None, got ",
      has_mean ? "a running_mean without running_var" : "a running_var without running_mean");
  const bool batch_statistics = training || !has_mean;
  // as torch.nn: eps > 0 with batch statistics, eps >= 0 with running ones
  TORCH_CHECK_VALUE(
      std::isfinite(eps) && (batch_statistics ? eps > 0 : eps >= 0), layer, ": eps must be ",
      batch_statistics ? "positive when normalizing with batch statistics" : "non-negative", ", got ", eps);
  if (batch_statistics) {
    // Values per channel: N (T*B, or B per time step with per_step) times the spatial size. One
    // value gives no variance; none gives an empty output, as in torch.nn.
    const int64_t per_step_dim = per_step && multi_step ? (batch_first ? 1 : 0) : -1;
    c10::SymInt count = 1;
    for (int64_t d = 0; d < input.dim(); ++d) {
      if (d != channel_dim && d != per_step_dim) count = count * input.sym_size(d);
    }
    // (no time steps at all: nothing is normalized, as in a loop of no torch.nn calls)
    const bool no_steps = per_step_dim >= 0 && input.sym_size(per_step_dim) == 0;
    TORCH_CHECK_VALUE(
        count != 1 || no_steps, layer, ": expected more than 1 value per channel", per_step && multi_step ? " and time step" : "",
        training ? " in training" : " without running statistics", "; got input ", input.sym_sizes());
  }
}

}  // namespace

std::tuple<at::Tensor, BatchNormLayout> batch_norm_layout(const at::Tensor& input, int64_t groups) {
  BatchNormLayout layout;
  layout.groups = groups;
  layout.channels = input.size(1);
  const int64_t spatial = input.dim() > 2 ? input.numel() / std::max<int64_t>(1, input.size(0) * input.size(1)) : 1;
  const int64_t rows = input.size(0) / groups;
  // No spatial size, or channels innermost in memory: walk [G, M*S, C]. Else [G, M, C, S], dense.
  layout.channels_last = spatial == 1 || channels_innermost(input);
  layout.rows = layout.channels_last ? rows * spatial : rows;
  layout.inner = layout.channels_last ? 1 : spatial;
  const bool walkable = spatial == 1 ? input.is_contiguous() : layout.channels_last || input.is_contiguous();
  return {walkable ? input : input.contiguous(), layout};
}

namespace {

void check_block_input(const char* op, const at::Tensor& input, int64_t groups) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()), op, ": expected a floating-point input, got ",
      dtype_name(input.scalar_type()));
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": expected a folded input [N, C, ...], got ", input.sym_sizes());
  TORCH_CHECK_VALUE(
      groups >= 1 && input.sym_size(0) % groups == 0, op, ": groups (", groups, ") must divide N = ",
      input.sym_size(0));
}

// A tensor beside the input: same device, floating point, `values` values.
void check_companion(
    const char* op, const at::Tensor& input, const at::Tensor& t, const char* name, const c10::SymInt& values,
    const char* what) {
  TORCH_CHECK_VALUE(
      t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but the input is on ", input.device());
  TORCH_CHECK_TYPE(
      at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(
      t.sym_numel() == values, op, ": ", name, " must hold ", what, " = ", values, " values, got ", t.sym_sizes());
}

// [groups, C], or [C] with one group
void check_block_statistic(const char* op, const at::Tensor& input, const at::Tensor& t, const char* name, int64_t groups) {
  check_companion(op, input, t, name, input.sym_size(1) * groups, "groups x channels");
  TORCH_CHECK_VALUE(
      (t.dim() == 2 && t.sym_size(0) == groups) || (t.dim() == 1 && groups == 1), op, ": ", name,
      " must be [groups, C] = [", groups, ", ", input.sym_size(1), "], got ", t.sym_sizes());
}

void check_block_parameter(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_companion(op, input, *t, name, input.sym_size(1), "channels");
  TORCH_CHECK_VALUE(t->dim() == 1, op, ": ", name, " must be [C], got ", t->sym_sizes());
}

void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK_VALUE(
      grad_output.device() == input.device(), op, ": grad_output is on ", grad_output.device(),
      " but the input is on ", input.device());
  TORCH_CHECK_VALUE(
      grad_output.sym_sizes() == input.sym_sizes(), op, ": grad_output must have the input's shape ",
      input.sym_sizes(), ", got ", grad_output.sym_sizes());
  TORCH_CHECK_TYPE(
      grad_output.scalar_type() == input.scalar_type(), op, ": grad_output must have the input's dtype ",
      dtype_name(input.scalar_type()), ", got ", dtype_name(grad_output.scalar_type()));
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and non-negative, got ", eps);
}

}  // namespace

void check_stats_arguments(const at::Tensor& input, int64_t groups) {
  check_block_input("batch_norm_stats", input, groups);
}

void check_elemt_arguments(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t groups) {
  const char* op = "batch_norm_elemt";
  check_block_input(op, input, groups);
  check_block_statistic(op, input, mean, "mean", groups);
  check_block_statistic(op, input, var, "var", groups);
  check_block_parameter(op, input, weight, "weight");
  check_block_parameter(op, input, bias, "bias");
  check_eps(op, eps);
}

void check_backward_reduce_arguments(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups) {
  const char* op = "batch_norm_backward_reduce";
  check_block_input(op, input, groups);
  check_grad_output(op, grad_output, input);
  check_block_statistic(op, input, mean, "mean", groups);
}

void check_backward_elemt_arguments(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    const c10::SymInt& count, int64_t groups) {
  const char* op = "batch_norm_backward_elemt";
  check_block_input(op, input, groups);
  check_grad_output(op, grad_output, input);
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, {&var, "var"}, {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}}) {
    check_block_statistic(op, input, *t, name, groups);
  }
  check_block_parameter(op, input, weight, "weight");
  check_eps(op, eps);
  // count covers every process when synchronised: at least this process's values per (group, channel)
  const c10::SymInt local = input.sym_numel() / (input.sym_size(1) * groups).max(1);
  TORCH_CHECK_VALUE(
      count >= local, op, ": count (", count, ") must be at least the input's values per group and channel (",
      local, ")");
}

void check_update_stats_arguments(
    const at::Tensor& mean, const at::Tensor& var, const c10::SymInt& count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked) {
  const char* op = "batch_norm_update_stats";
  TORCH_CHECK_VALUE(
      running_mean.dim() == 1 && running_var.sym_sizes() == running_mean.sym_sizes(), op,
      ": expected running_mean and running_var [C], got ", running_mean.sym_sizes(), " and ",
      running_var.sym_sizes());
  TORCH_CHECK_VALUE(
      mean.dim() == 2 && mean.sym_size(0) >= 1 && mean.sym_size(1) == running_mean.sym_size(0) &&
          var.sym_sizes() == mean.sym_sizes(),
      op, ": expected mean and var [G, C] with G >= 1 and C = ", running_mean.sym_size(0), ", got ", mean.sym_sizes(),
      " and ", var.sym_sizes());
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, {&var, "var"}, {&running_var, "running_var"}}) {
    TORCH_CHECK_VALUE(
        t->device() == running_mean.device(), op, ": ", name, " is on ", t->device(), " but running_mean is on ",
        running_mean.device());
    TORCH_CHECK_TYPE(
        at::isFloatingType(t->scalar_type()), op, ": ", name, " must be floating point, got ",
        dtype_name(t->scalar_type()));
  }
  TORCH_CHECK_TYPE(
      at::isFloatingType(running_mean.scalar_type()), op, ": running_mean must be floating point, got ",
      dtype_name(running_mean.scalar_type()));
  TORCH_CHECK_VALUE(
      running_mean.is_contiguous() && running_var.is_contiguous(), op, ": running statistics must be contiguous");
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    const at::Tensor& batches = *num_batches_tracked;
    TORCH_CHECK_TYPE(
        batches.scalar_type() == at::kLong, op, ": num_batches_tracked must be torch.int64, got ",
        dtype_name(batches.scalar_type()));
    TORCH_CHECK_VALUE(
        batches.sym_numel() == 1 && batches.device() == running_mean.device(), op,
        ": num_batches_tracked must be one value on ", running_mean.device(), ", got ", batches.sym_sizes(), " on ",
        batches.device());
  }
  TORCH_CHECK_VALUE(
      count >= 0 && count != 1, op, ": count must be 0 or more than 1 (values per channel), got ", count);
}

at::Tensor fold_time(const at::Tensor& input, bool multi_step) {
  return multi_step ? input.flatten(0, 1) : input;
}

at::Tensor unfold_time(const at::Tensor& output, const at::Tensor& input, bool multi_step) {
  return multi_step ? output.unflatten_symint(0, {input.sym_size(0), input.sym_size(1)}) : output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups) {
  // checked here as well: without batch statistics the building blocks run with one group
  TORCH_CHECK_VALUE(
      input.dim() >= 2 && groups >= 1 && input.sym_size(0) % groups == 0,
      "batch_norm_normalize: expected a folded input [N, C, ...] and groups dividing N, got input ",
      input.sym_sizes(), " and groups ", groups);
  if (batch_statistics) {
    auto [mean, var] = call_stats(input, groups);
    return {call_elemt(input, mean, var, weight, bias, eps, groups), mean, var};
  }
  TORCH_CHECK_VALUE(
      running_mean.has_value() && running_var.has_value(),
      "batch_norm_normalize: running statistics are needed without batch statistics");
  // Empty statistics out: an op's outputs may not alias its inputs, and copies of the running
  // ones would cost as much as normalizing a small input.
  const auto none = [&] { return at::empty({0}, input.options().dtype(at::toOpMathType(input.scalar_type()))); };
  return {call_elemt(input, running_mean->unsqueeze(0), running_var->unsqueeze(0), weight, bias, eps, 1), none(), none()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, bool batch_statistics, double eps, int64_t groups,
    std::array<bool, 3> needs) {
  at::Tensor sum_dy, sum_dy_xmu, grad_input, grad_weight, grad_bias;
  // the element op with a zero mean scales by invstd (and the weight); made once, on first use
  at::Tensor zero_mean;
  const auto zeros = [&]() -> const at::Tensor& {
    if (!zero_mean.defined()) zero_mean = at::zeros_like(mean);
    return zero_mean;
  };
  if (needs[1] || needs[2] || (needs[0] && batch_statistics)) {
    std::tie(sum_dy, sum_dy_xmu) = call_backward_reduce(grad_output, input, mean, groups);
  }
  if (needs[0]) {
    grad_input = batch_statistics
        ? call_backward_elemt(grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, eps,
                              input.sym_numel() / mean.sym_numel(), groups)
        // running statistics are constants: dx = dy * invstd * weight
        : call_elemt(grad_output, zeros(), var, weight, std::nullopt, eps, groups);
  }
  // [G, C] -> [C]; with one group a view, not a kernel launch
  const auto over_groups = [](const at::Tensor& t) { return t.size(0) == 1 ? t.squeeze(0) : t.sum(0); };
  if (needs[1] && input.sym_numel() == 0) {
    grad_weight = at::zeros_like(*weight);  // the statistics of no values are NaN: nothing to scale
  } else if (needs[1]) {
    // sum_dy_xmu * invstd per (group, channel) is the element op on [G, C] with a zero mean: one
    // kernel, where `sum_dy_xmu * (var + eps).rsqrt()` is three (and a scalar conversion)
    const at::Tensor scaled = call_elemt(sum_dy_xmu, zeros(), var, std::nullopt, std::nullopt, eps, groups);
    grad_weight = cast(over_groups(scaled), weight->scalar_type());
  }
  if (needs[2]) grad_bias = over_groups(sum_dy);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace detail

namespace {

// batch_norm_normalize on any device: the building blocks do the per-element work.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_normalize_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups) {
  return detail::normalize_forward(input, weight, bias, running_mean, running_var, batch_statistics, eps, groups);
}

// The layer op: checks in the user's terms, fold, normalize, update the running statistics.
at::Tensor batch_norm_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, int64_t num_features, int64_t dims, bool multi_step_mode, bool per_step, bool batch_first) {
  const bool multi_step = detail::input_is_multi_step(input.dim(), dims, multi_step_mode);
  detail::check_batch_norm_arguments(
      input, weight, bias, running_mean, running_var, num_batches_tracked, training, eps, num_features, dims,
      multi_step, per_step, batch_first);
  const bool has_running = running_mean.has_value() && running_mean->defined();
  const bool batch_statistics = training || !has_running;
  const bool per_step_statistics = per_step && multi_step && batch_statistics;
  // Per-step statistics group the folded rows by t: [B, T, ...] input is made time-major (a copy).
  const bool time_major = !(per_step_statistics && batch_first);
  const at::Tensor steps = time_major ? input : input.transpose(0, 1).contiguous();
  // T = 0 steps with per-step statistics: one empty group, and no update (torch.nn called 0 times)
  const int64_t groups = per_step_statistics ? std::max<int64_t>(1, steps.size(0)) : 1;
  const at::Tensor folded = detail::fold_time(steps, multi_step);
  at::Tensor mean, var;
  const at::Tensor output = detail::call_normalize_first(
      folded, weight, bias, running_mean, running_var, batch_statistics, eps, groups, mean, var);
  if (training && has_running && !(per_step_statistics && steps.size(0) == 0)) {
    detail::call_update_stats(
        mean, var, folded.sym_numel() / mean.sym_numel(), *running_mean, *running_var, num_batches_tracked,
        momentum);
  }
  const at::Tensor unfolded = detail::unfold_time(output, steps, multi_step);
  return time_major ? unfolded : unfolded.transpose(0, 1).contiguous();
}

}  // namespace

at::Tensor batch_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, int64_t num_features, int64_t dims, bool multi_step_mode, bool per_step, bool batch_first) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm", "")
          .typed<decltype(batch_norm_composite)>();
  return op.call(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                 num_features, dims, multi_step_mode, per_step, batch_first);
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float? momentum, "
      "float eps, int num_features, int dims, bool multi_step_mode, bool per_step=False, bool batch_first=False) "
      "-> Tensor");
  m.def(
      "batch_norm_normalize(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool batch_statistics, float eps, int groups) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_update_stats(Tensor mean, Tensor var, SymInt count, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float? momentum) -> ()");
  m.def("batch_norm_stats(Tensor input, int groups) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
      "int groups) -> Tensor");
  m.def("batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, int groups) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor sum_dy, Tensor sum_dy_xmu, float eps, SymInt count, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(matterhorn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", &matterhorn::ops::batch_norm_composite);
}

TORCH_LIBRARY_IMPL(matterhorn, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_normalize", &matterhorn::ops::batch_norm_normalize_composite);
}
