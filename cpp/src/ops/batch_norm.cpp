// BatchNorm's core: schemas, argument checks and the device-generic compositions on the folded
// [N, C, ...] tensor (the per-element work is in the building-block kernels:
// ops/cpu/batch_norm_kernel.cpp, ...). What N is, and how many groups it has, the layer decides:
// ops/batch_norm_layer.cpp.
#include "ops/batch_norm.h"

#include <cmath>

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/irange.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "matterhorn/ops/batch_norm.h"
#include "ops/checks.h"

namespace matterhorn::ops {
namespace detail {

std::tuple<at::Tensor, at::Tensor> call_stats(const at::Tensor& input, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::batch_norm_stats", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return op.call(input, groups);
}

at::Tensor call_elemt(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm_elemt", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double, int64_t, const std::optional<at::Tensor>&)>();
  return op.call(input, mean, var, weight, bias, eps, groups, scale);
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
    const c10::SymInt& count, int64_t groups, const std::optional<at::Tensor>& scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm_backward_elemt", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, c10::SymInt,
                            int64_t, const std::optional<at::Tensor>&)>();
  return op.call(grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, eps, count, groups, scale);
}

at::Tensor call_normalize_first(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups, const std::optional<at::Tensor>& scale, at::Tensor& mean,
    at::Tensor& var) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm_normalize", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double, int64_t,
              const std::optional<at::Tensor>&)>();
  at::Tensor output;
  std::tie(output, mean, var) =
      op.call(input, weight, bias, running_mean, running_var, batch_statistics, eps, groups, scale);
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

namespace {

// A parameter or running statistic of the core: [C] or [groups, C]; the input's dtype, or float32
// beside a reduced-precision input.
void check_parameter(const NormCaller& who, const at::Tensor& input, const std::optional<at::Tensor>& param,
                     const char* name, int64_t groups) {
  if (!given(param)) return;
  const c10::SymInt& C = input.sym_size(1);
  TORCH_CHECK_VALUE(
      (param->dim() == 1 && param->sym_size(0) == C) || (param->dim() == 2 && param->sym_size(0) == groups &&
                                                         param->sym_size(1) == C),
      who.name, ": ", name, " must be [num_features] = [", C, "]", groups > 1 ? " or [T, num_features]" : "",
      ", got ", param->sym_sizes());
  check_norm_parameter_dtype_and_device(who.name, input, *param, name);
}

// The checks of the core op on the folded input, named after the caller (the layer or the op).
void check_core_arguments(
    const NormCaller& who, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    bool training, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()), who.name, ": expected a floating-point input, got ",
      dtype_name(input.scalar_type()));
  TORCH_CHECK_VALUE(input.dim() >= 2, who.name, ": expected a folded input [N, C, ...], got ", input.sym_sizes());
  TORCH_CHECK_VALUE(
      groups >= 1 ? input.sym_size(0) % groups == 0 : groups == 0 && input.sym_size(0) == 0, who.name,
      ": groups (", groups, ") must divide N = ", input.sym_size(0), " (0 groups only for N = 0)");
  const int64_t steps = std::max<int64_t>(groups, 1);
  check_parameter(who, input, weight, "weight", steps);
  check_parameter(who, input, bias, "bias", steps);
  check_parameter(who, input, running_mean, "running_mean", steps);
  check_parameter(who, input, running_var, "running_var", steps);
  if (given(scale)) {
    TORCH_CHECK_VALUE(
        scale->dim() == 1 && scale->sym_size(0) >= 1 && input.sym_size(0) % scale->sym_size(0) == 0 &&
            (steps == 1 || scale->sym_size(0) == steps),
        who.name, ": scale must be [T] with T dividing N = ", input.sym_size(0), " (and groups 1 or T), got ",
        scale->sym_sizes());
    check_norm_parameter_dtype_and_device(who.name, input, *scale, "scale");
  }
  if (given(num_batches_tracked)) {
    TORCH_CHECK_VALUE(
        num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->sym_numel() == 1, who.name,
        ": num_batches_tracked must be a single torch.int64 value, got ",
        dtype_name(num_batches_tracked->scalar_type()), " ", num_batches_tracked->sym_sizes());
  }
  const bool has_mean = given(running_mean), has_var = given(running_var);
  TORCH_CHECK_VALUE(
      has_mean == has_var, who.name, ": running_mean and running_var must both be tensors or both be None, got ",
      has_mean ? "a running_mean without running_var" : "a running_var without running_mean");
  TORCH_CHECK_VALUE(
      !has_mean || running_mean->sym_sizes() == running_var->sym_sizes(), who.name,
      ": running_mean and running_var must have one shape, got ", running_mean->sym_sizes(), " and ",
      running_var->sym_sizes());
  const bool batch_statistics = training || !has_mean;
  // as torch.nn: eps > 0 with batch statistics, eps >= 0 with running ones
  TORCH_CHECK_VALUE(
      std::isfinite(eps) && (batch_statistics ? eps > 0 : eps >= 0), who.name, ": eps must be ",
      batch_statistics ? "positive when normalizing with batch statistics" : "non-negative", ", got ", eps);
  if (batch_statistics && groups >= 1) {
    // Values per (group, channel). One gives no variance; none gives an empty output, as in torch.nn.
    c10::SymInt count = input.sym_size(0) / groups;
    for (const auto d : c10::irange(2, input.dim())) count = count * input.sym_size(d);
    TORCH_CHECK_VALUE(
        count != 1, who.name, ": expected more than 1 value per channel", who.per_group,
        training ? " in training" : " without running statistics", "; got input ", who.shape);
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

// A tensor beside the input: same device, floating point.
void check_companion(const char* op, const at::Tensor& input, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but the input is on ", input.device());
  TORCH_CHECK_TYPE(
      at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", dtype_name(t.scalar_type()));
}

// [groups, C], or shared by every group: [1, C] or [C]. Returns whether it is per group.
bool check_per_group(const char* op, const at::Tensor& input, const at::Tensor& t, const char* name, int64_t groups) {
  check_companion(op, input, t, name);
  const c10::SymInt& C = input.sym_size(1);
  const bool shared = (t.dim() == 1 && t.sym_size(0) == C) || (t.dim() == 2 && t.sym_size(0) == 1 && t.sym_size(1) == C);
  const bool per_group = t.dim() == 2 && t.sym_size(0) == groups && t.sym_size(1) == C;
  TORCH_CHECK_VALUE(
      shared || per_group, op, ": ", name, " must hold groups x channels = ", groups, " x ", C,
      " values ([groups, C]) or one per channel ([C] or [1, C]), got ", t.sym_sizes());
  return per_group && groups > 1;
}

bool check_optional_per_group(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& t, const char* name, int64_t groups) {
  return t.has_value() && t->defined() && check_per_group(op, input, *t, name, groups);
}

void check_scale(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& scale, int64_t groups) {
  if (!scale.has_value() || !scale->defined()) return;
  check_companion(op, input, *scale, "scale");
  TORCH_CHECK_VALUE(
      scale->dim() == 1 && scale->sym_size(0) == groups, op, ": scale must be [groups] = [", groups, "], got ",
      scale->sym_sizes());
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
    const std::optional<at::Tensor>& bias, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  const char* op = "batch_norm_elemt";
  check_block_input(op, input, groups);
  const bool per_group = check_per_group(op, input, mean, "mean", groups);
  TORCH_CHECK_VALUE(
      check_per_group(op, input, var, "var", groups) == per_group, op,
      ": mean and var must both be per group or both shared, got ", mean.sym_sizes(), " and ", var.sym_sizes());
  check_optional_per_group(op, input, weight, "weight", groups);
  check_optional_per_group(op, input, bias, "bias", groups);
  check_scale(op, input, scale, groups);
  check_eps(op, eps);
}

void check_backward_reduce_arguments(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups) {
  const char* op = "batch_norm_backward_reduce";
  check_block_input(op, input, groups);
  check_grad_output(op, grad_output, input);
  check_per_group(op, input, mean, "mean", groups);
}

void check_backward_elemt_arguments(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    const c10::SymInt& count, int64_t groups, const std::optional<at::Tensor>& scale) {
  const char* op = "batch_norm_backward_elemt";
  check_block_input(op, input, groups);
  check_grad_output(op, grad_output, input);
  const bool per_group = check_per_group(op, input, mean, "mean", groups);
  for (const auto& [t, name] : {std::pair{&var, "var"}, {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}}) {
    TORCH_CHECK_VALUE(
        check_per_group(op, input, *t, name, groups) == per_group, op, ": mean, var, sum_dy and sum_dy_xmu must all "
        "be per group or all shared, got mean ", mean.sym_sizes(), " and ", name, " ", t->sym_sizes());
  }
  // dx's sums run over a statistics group: a weight that changes inside one is not this formula
  TORCH_CHECK_VALUE(
      !check_optional_per_group(op, input, weight, "weight", groups) || per_group, op,
      ": a weight per group needs statistics per group");
  check_scale(op, input, scale, groups);
  check_eps(op, eps);
  // count covers every process when synchronised: at least this process's values per statistics group and channel
  const c10::SymInt local = input.sym_numel() / (input.sym_size(1) * (per_group ? groups : 1)).max(1);
  TORCH_CHECK_VALUE(
      count >= local, op, ": count (", count, ") must be at least the input's values per group and channel (",
      local, ")");
}

void check_update_stats_arguments(
    const at::Tensor& mean, const at::Tensor& var, const c10::SymInt& count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked) {
  const char* op = "batch_norm_update_stats";
  TORCH_CHECK_VALUE(
      mean.dim() == 2 && mean.sym_size(0) >= 1 && var.sym_sizes() == mean.sym_sizes(), op,
      ": expected mean and var [G, C] with G >= 1, got ", mean.sym_sizes(), " and ", var.sym_sizes());
  const bool shared = running_mean.dim() == 1 && running_mean.sym_size(0) == mean.sym_size(1);
  TORCH_CHECK_VALUE(
      (shared || running_mean.sym_sizes() == mean.sym_sizes()) && running_var.sym_sizes() == running_mean.sym_sizes(),
      op, ": expected running_mean and running_var [C] = [", mean.sym_size(1), "] or [G, C] = ", mean.sym_sizes(),
      ", got ", running_mean.sym_sizes(), " and ", running_var.sym_sizes());
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  // checked here as well: without batch statistics the building blocks run with other groups
  TORCH_CHECK_VALUE(
      input.dim() >= 2 && groups >= 1 && input.sym_size(0) % groups == 0,
      "batch_norm_normalize: expected a folded input [N, C, ...] and groups dividing N, got input ",
      input.sym_sizes(), " and groups ", groups);
  // groups of the element pass (an int in the building blocks' schemas: a symbolic size is specialised)
  const int64_t steps = given(scale) ? scale->sym_size(0).guard_int(__FILE__, __LINE__) : groups;
  TORCH_CHECK_VALUE(
      groups == 1 || steps == groups, "batch_norm_normalize: scale must have one value per group, got ",
      scale->sym_sizes(), " for ", groups, " groups");
  if (batch_statistics) {
    auto [mean, var] = call_stats(input, groups);
    return {call_elemt(input, mean, var, weight, bias, eps, steps, scale), mean, var};
  }
  TORCH_CHECK_VALUE(
      given(running_mean) && given(running_var),
      "batch_norm_normalize: running statistics are needed without batch statistics");
  // Empty statistics out: an op's outputs may not alias its inputs, and copies of the running
  // ones would cost as much as normalizing a small input.
  const auto none = [&] { return at::empty({0}, input.options().dtype(at::toOpMathType(input.scalar_type()))); };
  const auto rows = [](const at::Tensor& t) { return t.dim() == 1 ? t.unsqueeze(0) : t; };
  return {call_elemt(input, rows(*running_mean), rows(*running_var), weight, bias, eps, steps, scale), none(), none()};
}

namespace {

// [G, C] -> the parameter's shape: summed over the groups for a [C] parameter (with one group a
// view, not a kernel launch), as it is for a [G, C] one.
at::Tensor like_parameter(const at::Tensor& t, const at::Tensor& param) {
  if (param.dim() == 2) return t;
  return t.size(0) == 1 ? t.squeeze(0) : t.sum(0);
}

// Backward with a scale per group (TEBN): y = (xhat * w + b) * scale[g]. The statistics groups
// are 1 or the scale's; the element and reduction passes run per scale group.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scaled_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, bool batch_statistics,
    double eps, const at::Tensor& scale, std::array<bool, 4> needs) {
  const int64_t steps = scale.sym_size(0).guard_int(__FILE__, __LINE__);
  const bool sums_for_input = needs[0] && batch_statistics;
  at::Tensor grad_input, grad_weight, grad_bias, grad_scale;
  if (needs[0] && !batch_statistics) {  // running statistics are constants: dx = dy * invstd * weight * scale
    grad_input = call_elemt(grad_output, at::zeros_like(mean), var, weight, std::nullopt, eps, steps, scale);
  }
  if (!(sums_for_input || needs[1] || needs[2] || needs[3])) return {grad_input, grad_weight, grad_bias, grad_scale};
  auto [sum_dy, sum_dy_xmu] = call_backward_reduce(grad_output, input, mean, steps);  // [steps, C]
  const auto acc = sum_dy.scalar_type();
  const at::Tensor s = cast(scale, acc).unsqueeze(1);
  const bool empty = input.sym_numel() == 0;  // statistics of no values are NaN: nothing to scale
  const at::Tensor invstd = needs[1] || needs[3] ? (var + eps).rsqrt() : at::Tensor();
  if (needs[3]) {
    at::Tensor per_value = sum_dy_xmu * invstd;  // sum(dy * xhat) per (step, channel)
    if (given(weight)) per_value = per_value * cast(*weight, acc);
    if (given(bias)) per_value = per_value + sum_dy * cast(*bias, acc);
    grad_scale = empty ? at::zeros_like(scale) : cast(per_value.sum(1), scale.scalar_type());
  }
  // the sums of dy * scale per step, and per statistics group for dx
  const at::Tensor scaled_dy = sums_for_input || needs[2] ? sum_dy * s : at::Tensor();
  const at::Tensor scaled_dy_xmu = sums_for_input || needs[1] ? sum_dy_xmu * s : at::Tensor();
  if (sums_for_input) {
    const bool shared = mean.size(0) == 1 && steps > 1;
    grad_input = call_backward_elemt(
        grad_output, input, mean, var, weight, shared ? scaled_dy.sum(0, true) : scaled_dy,
        shared ? scaled_dy_xmu.sum(0, true) : scaled_dy_xmu, eps, input.sym_numel() / mean.sym_numel().max(1), steps,
        scale);
  }
  if (needs[1]) {
    grad_weight = empty ? at::zeros_like(*weight)
                        : cast(like_parameter(scaled_dy_xmu * invstd, *weight), weight->scalar_type());
  }
  if (needs[2]) grad_bias = cast(like_parameter(scaled_dy, *bias), bias->scalar_type());
  return {grad_input, grad_weight, grad_bias, grad_scale};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> normalize_backward(
    const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, bool batch_statistics,
    double eps, int64_t groups, const std::optional<at::Tensor>& scale, std::array<bool, 4> needs) {
  // An expanded or strided grad (y.sum()'s) made dense once, not by each building block it meets
  const at::Tensor grad_output = grad.is_contiguous() || channels_innermost(grad)
      ? grad
      : grad.contiguous(input.suggest_memory_format());
  if (given(scale)) {
    return scaled_backward(grad_output, input, weight, bias, mean, var, batch_statistics, eps, *scale, needs);
  }
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
                              input.sym_numel() / mean.sym_numel().max(1), groups, std::nullopt)
        // running statistics are constants: dx = dy * invstd * weight
        : call_elemt(grad_output, zeros(), var, weight, std::nullopt, eps, groups);
  }
  if (needs[1] && input.sym_numel() == 0) {
    grad_weight = at::zeros_like(*weight);  // the statistics of no values are NaN: nothing to scale
  } else if (needs[1]) {
    // sum_dy_xmu * invstd per (group, channel) is the element op on [G, C] with a zero mean: one
    // kernel, where `sum_dy_xmu * (var + eps).rsqrt()` is three (and a scalar conversion)
    const at::Tensor scaled = call_elemt(sum_dy_xmu, zeros(), var, std::nullopt, std::nullopt, eps, groups);
    grad_weight = cast(like_parameter(scaled, *weight), weight->scalar_type());
  }
  if (needs[2]) grad_bias = cast(like_parameter(sum_dy, *bias), bias->scalar_type());
  return {grad_input, grad_weight, grad_bias, at::Tensor()};
}

at::Tensor batch_norm_folded(
    const NormCaller& who, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  check_core_arguments(
      who, input, weight, bias, running_mean, running_var, num_batches_tracked, training, eps, groups, scale);
  const bool has_running = given(running_mean);
  const bool batch_statistics = training || !has_running;
  at::Tensor mean, var;
  const at::Tensor output = call_normalize_first(
      input, weight, bias, running_mean, running_var, batch_statistics, eps, std::max<int64_t>(groups, 1), scale,
      mean, var);
  // no groups (no time steps): nothing was normalized, as in a loop of no torch.nn calls
  if (training && has_running && groups >= 1) {
    call_update_stats(
        mean, var, input.sym_numel() / mean.sym_numel().max(1), *running_mean, *running_var, num_batches_tracked,
        momentum);
  }
  return output;
}

}  // namespace detail

namespace {

at::Tensor batch_norm_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  const detail::NormCaller op{"batch_norm", groups > 1 ? " and group" : "", input.sym_sizes()};
  return detail::batch_norm_folded(
      op, input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, groups, scale);
}

// batch_norm_normalize on any device: the building blocks do the per-element work.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_normalize_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool batch_statistics, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  return detail::normalize_forward(
      input, weight, bias, running_mean, running_var, batch_statistics, eps, groups, scale);
}

}  // namespace

at::Tensor batch_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::batch_norm", "")
          .typed<decltype(batch_norm_composite)>();
  return op.call(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, groups,
                 scale);
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float? momentum, "
      "float eps, int groups=1, Tensor? scale=None) -> Tensor");
  m.def(
      "batch_norm_normalize(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool batch_statistics, float eps, int groups, Tensor? scale=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_update_stats(Tensor mean, Tensor var, SymInt count, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float? momentum) -> ()");
  m.def("batch_norm_stats(Tensor input, int groups) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
      "int groups, Tensor? scale=None) -> Tensor");
  m.def("batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, int groups) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor sum_dy, Tensor sum_dy_xmu, float eps, SymInt count, int groups, Tensor? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(matterhorn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", &matterhorn::ops::batch_norm_composite);
}

// torch.vmap decomposes the core (see batch_norm_layer's) into its building blocks; batch_norm_normalize
// then runs once per example (functorch's fallback). The running statistics are one set of buffers for
// every example: their update under vmap is refused, as torch.nn refuses it.
TORCH_LIBRARY_IMPL(matterhorn, FuncTorchBatchedDecomposition, m) {
  m.impl("batch_norm", &matterhorn::ops::batch_norm_composite);
}

TORCH_LIBRARY_IMPL(matterhorn, FuncTorchBatched, m) {
  m.impl(
      "batch_norm_update_stats",
      [](const at::Tensor&, const at::Tensor&, c10::SymInt, const at::Tensor&, const at::Tensor&,
         const std::optional<at::Tensor>&, std::optional<double>) {
        TORCH_CHECK_VALUE(
            false, "BatchNorm under torch.vmap in training would update its running statistics, one set for every "
            "example (torch.nn refuses it too): call eval(), or build the layer with track_running_stats=False");
      });
}

TORCH_LIBRARY_IMPL(matterhorn, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_normalize", &matterhorn::ops::batch_norm_normalize_composite);
}

// The building blocks have no derivatives (batch_norm_normalize has): a backward through one
// raises, where torch's default would warn and give no gradient.
TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  for (const char* block : {"batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_reduce",
                            "batch_norm_backward_elemt", "batch_norm_update_stats"}) {
    m.impl(block, torch::autograd::autogradNotImplementedFallback());
  }
}
