// BatchNorm: schemas, argument checks in the user's terms, and the device-generic compositions
// (the per-element work is in the building-block kernels: ops/cpu/batch_norm_kernel.cpp, ...).
#include "ops/batch_norm.h"

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
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    int64_t num_features, int64_t dims, bool multi_step, bool per_step, bool batch_first) {
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
  const bool batch_statistics = training || !(running_mean.has_value() && running_mean->defined());
  if (training || batch_statistics) {
    // Values per channel (per time step with per_step) must be more than one.
    c10::SymInt count = input.sym_numel() / num_features;
    if (per_step && multi_step) count = count / input.sym_size(batch_first ? 1 : 0);
    TORCH_CHECK_VALUE(
        count > 1, layer, ": expected more than 1 value per channel", per_step ? " and time step" : "",
        " in training; got input ", input.sym_sizes());
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

void check_batch_norm_block(const char* op, const at::Tensor& input, int64_t groups) {
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": expected a folded input [N, C, ...], got ", input.sym_sizes());
  TORCH_CHECK_VALUE(
      groups >= 1 && input.sym_size(0) % groups == 0, op, ": groups (", groups, ") must divide N = ",
      input.sym_size(0));
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
  if (needs[1]) {
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
      input, weight, bias, running_mean, running_var, training, num_features, dims, multi_step, per_step, batch_first);
  const bool has_running = running_mean.has_value() && running_mean->defined();
  const bool batch_statistics = training || !has_running;
  const bool per_step_statistics = per_step && multi_step && batch_statistics;
  // Per-step statistics group the folded rows by t: [B, T, ...] input is made time-major (a copy).
  const bool time_major = !(per_step_statistics && batch_first);
  const at::Tensor steps = time_major ? input : input.transpose(0, 1).contiguous();
  const int64_t groups = per_step_statistics ? steps.size(0) : 1;
  const at::Tensor folded = detail::fold_time(steps, multi_step);
  at::Tensor mean, var;
  const at::Tensor output = detail::call_normalize_first(
      folded, weight, bias, running_mean, running_var, batch_statistics, eps, groups, mean, var);
  if (training && has_running) {
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
