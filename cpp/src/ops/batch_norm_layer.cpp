// The BatchNorm layers' one place for layout: from the layer's input ([T, B, C, ...], [B, T, C, ...]
// with batch_first, or one step [B, C, ...]) to the core's folded [N, C, ...] tensor and its
// groups, and back; checks and messages in the layer's terms. Used by the layer op
// matterhorn::batch_norm_layer (the Python classes, TorchScript, the C++ modules) and, through
// batch_norm_layer_fold / _unfold, by the synchronised path.
#include <string>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "matterhorn/ops/batch_norm.h"
#include "ops/batch_norm.h"
#include "ops/checks.h"

namespace matterhorn::ops {
namespace {

using detail::given;

// The layer's class name ends in its spatial dimensions: "BatchNorm2d", "BatchNormThroughTime1d".
int64_t dims_of(c10::string_view layer) {
  const bool named = layer.size() >= 2 && layer.back() == 'd' && layer[layer.size() - 2] >= '1' &&
                     layer[layer.size() - 2] <= '3';
  TORCH_CHECK_VALUE(named, "batch_norm_layer: layer must name a 1d, 2d or 3d layer (e.g. BatchNorm2d), got '", layer,
                    "'");
  return layer[layer.size() - 2] - '0';
}

// The page's names: [L] (optional for BatchNorm1d), [H, W], [H, W, L].
std::string accepted_shapes(int64_t dims, bool multi_step_only) {
  std::string multi, single;
  switch (dims) {
    case 1: multi = "[T, B, C] or [T, B, C, L]", single = "[B, C] or [B, C, L]"; break;
    case 2: multi = "[T, B, C, H, W]", single = "[B, C, H, W]"; break;
    default: multi = "[T, B, C, H, W, L]", single = "[B, C, H, W, L]";
  }
  if (multi_step_only) return multi + " (multi-step only)";
  return multi + " in multi-step mode" + (dims == 1 ? ", " : " or ") + single + " in single-step mode";
}

// The rank tells single- from multi-step, except BatchNorm1d's 3-D input, which the mode decides.
bool input_is_multi_step(int64_t rank, int64_t dims, bool multi_step_mode) {
  return dims == 1 ? rank == 4 || (rank == 3 && multi_step_mode) : rank == dims + 3;
}

bool rank_accepted(int64_t rank, int64_t dims, bool multi_step) {
  const int64_t leading = multi_step ? 2 : 1;
  return dims == 1 ? (rank == leading + 1 || rank == leading + 2) : rank == leading + 1 + dims;
}

bool per_step_tensor(const std::optional<at::Tensor>& t) { return given(t) && t->dim() == 2; }

}  // namespace

namespace detail {

BatchNormFold fold_for_batch_norm(
    const at::Tensor& input, c10::string_view layer, int64_t num_features, bool multi_step_mode, bool per_step,
    bool batch_first, bool batch_statistics, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& scale) {
  const int64_t dims = dims_of(layer);
  // the temporal layers (a scale per step, or parameters per step) are about time: multi-step only
  const bool temporal = given(scale) || per_step_tensor(weight) || per_step_tensor(running_mean);
  BatchNormFold fold;
  fold.multi_step = input_is_multi_step(input.dim(), dims, multi_step_mode || temporal);
  TORCH_CHECK_VALUE(
      rank_accepted(input.dim(), dims, fold.multi_step) && (fold.multi_step || !temporal), layer,
      ": expected input ", accepted_shapes(dims, temporal), "; got a ", input.dim(), "-D tensor ", input.sym_sizes());
  const int64_t channel_dim = fold.multi_step ? 2 : 1;
  TORCH_CHECK_VALUE(
      input.sym_size(channel_dim) == num_features, layer, "(num_features=", num_features, "): expected ",
      num_features, " channels at dimension ", channel_dim, " (C in ", accepted_shapes(dims, temporal), "); got ",
      input.sym_sizes());
  // Steps as groups of rows: per-step statistics (per_step in training), per-step parameters or
  // running statistics (BNTT), a scale per step (TEBN). [B, T, ...] is then made time-major (a copy).
  const bool per_step_groups =
      fold.multi_step && ((per_step && batch_statistics) || per_step_tensor(weight) || per_step_tensor(running_mean));
  const bool by_step = per_step_groups || (fold.multi_step && given(scale));
  fold.time_major = !(by_step && batch_first);
  const at::Tensor steps = fold.time_major ? input : input.transpose(0, 1).contiguous();
  const c10::SymInt T = fold.multi_step ? steps.sym_size(0) : c10::SymInt(1);
  const auto expected_steps = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK_VALUE(
        t.sym_size(0) == T, layer, ": expected T = ", t.sym_size(0), " time steps (", what, "), got ", T,
        " in input ", input.sym_sizes(), batch_first ? " (batch_first: [B, T, ...])" : "");
  };
  if (given(scale)) expected_steps(*scale, "the length of scale");
  if (per_step_tensor(weight)) expected_steps(*weight, "weight is per step");
  if (per_step_tensor(running_mean)) expected_steps(*running_mean, "running statistics are per step");
  // T = 0 steps with per-step statistics: no groups, and no update (torch.nn called 0 times)
  // (the groups are an int in the core's schema: a symbolic T is specialised)
  fold.groups = per_step_groups ? T.guard_int(__FILE__, __LINE__) : 1;
  fold.steps = T;
  fold.batch = fold.multi_step ? steps.sym_size(1) : c10::SymInt(0);
  fold.folded = fold.multi_step ? steps.flatten(0, 1) : steps;
  return fold;
}

at::Tensor unfold_from_batch_norm(const at::Tensor& output, const BatchNormFold& fold) {
  if (!fold.multi_step) return output;
  const at::Tensor unfolded = output.unflatten_symint(0, {fold.steps, fold.batch});
  return fold.time_major ? unfolded : unfolded.transpose(0, 1).contiguous();
}

}  // namespace detail

namespace {

at::Tensor batch_norm_layer_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum, double eps,
    c10::string_view layer, int64_t num_features, bool multi_step_mode, bool per_step, bool batch_first,
    const std::optional<at::Tensor>& scale) {
  const bool batch_statistics = training || !given(running_mean);
  const detail::BatchNormFold fold = detail::fold_for_batch_norm(
      input, layer, num_features, multi_step_mode, per_step, batch_first, batch_statistics, weight, running_mean,
      scale);
  const bool per_step_statistics = fold.groups != 1 || (per_step && fold.multi_step);
  const detail::NormCaller who{layer, per_step_statistics ? " and time step" : "", input.sym_sizes()};
  const at::Tensor output = detail::batch_norm_folded(
      who, fold.folded, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
      fold.groups, scale);
  return detail::unfold_from_batch_norm(output, fold);
}

// The synchronised path's fold: (folded, groups) and the output back in the input's layout.
std::tuple<at::Tensor, int64_t> batch_norm_layer_fold(
    const at::Tensor& input, c10::string_view layer, int64_t num_features, bool multi_step_mode, bool per_step,
    bool batch_first, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& scale) {
  const auto fold = detail::fold_for_batch_norm(
      input, layer, num_features, multi_step_mode, per_step, batch_first, true, weight, running_mean, scale);
  return {fold.folded, fold.groups};
}

at::Tensor batch_norm_layer_unfold(
    const at::Tensor& output, const at::Tensor& input, c10::string_view layer, int64_t num_features,
    bool multi_step_mode, bool per_step, bool batch_first, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& scale) {
  auto fold = detail::fold_for_batch_norm(
      input, layer, num_features, multi_step_mode, per_step, batch_first, true, weight, running_mean, scale);
  return detail::unfold_from_batch_norm(output, fold);
}

}  // namespace

at::Tensor batch_norm_layer(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, std::optional<double> momentum, double eps,
    const std::string& layer, int64_t num_features, bool multi_step_mode, bool per_step, bool batch_first,
    const std::optional<at::Tensor>& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::batch_norm_layer", "")
                             .typed<decltype(batch_norm_layer_composite)>();
  return op.call(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, layer,
                 num_features, multi_step_mode, per_step, batch_first, scale);
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def(
      "batch_norm_layer(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float? momentum, float eps, "
      "str layer, int num_features, bool multi_step_mode, bool per_step=False, bool batch_first=False, "
      "Tensor? scale=None) -> Tensor");
  m.def(
      "batch_norm_layer_fold(Tensor input, str layer, int num_features, bool multi_step_mode, bool per_step, "
      "bool batch_first, Tensor? weight=None, Tensor? running_mean=None, Tensor? scale=None) -> (Tensor, int)");
  m.def(
      "batch_norm_layer_unfold(Tensor output, Tensor input, str layer, int num_features, bool multi_step_mode, "
      "bool per_step, bool batch_first, Tensor? weight=None, Tensor? running_mean=None, Tensor? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(matterhorn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_layer", &matterhorn::ops::batch_norm_layer_composite);
  m.impl("batch_norm_layer_fold", &matterhorn::ops::batch_norm_layer_fold);
  m.impl("batch_norm_layer_unfold", &matterhorn::ops::batch_norm_layer_unfold);
}

// torch.vmap decomposes the layer op (its schema may mutate the running statistics, which the
// batching fallback refuses) into the core and then the building blocks.
TORCH_LIBRARY_IMPL(matterhorn, FuncTorchBatchedDecomposition, m) {
  m.impl("batch_norm_layer", &matterhorn::ops::batch_norm_layer_composite);
}
