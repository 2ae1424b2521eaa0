// Autograd kernels of spike_linear / spike_conv / spike_conv_transpose: the dense forward (the
// ops' own kernels, below autograd), the input kept as bits (pack_spikes), and hand-written nodes
// whose backward unpacks the bits only for the weight gradient and then makes the calls torch's
// AddmmBackward0 / ConvolutionBackward0 make (at::mm, at::convolution_backward). The input
// gradient needs no input values: without a weight gradient nothing is unpacked. Not supported,
// with a clear error: double backward (create_graph=True). Forward-mode AD runs the dense ops,
// which torch has formulas for (their graph keeps the dense input).
#include <mutex>
#include <string>
#include <vector>

#include <ATen/ExpandUtils.h>  // at::sum_to
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/pad.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "ops/autograd/node.h"
#include "ops/conv.h"
#include "ops/linear.h"
#include "ops/spike_pack.h"

namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
namespace detail = matterhorn::ops::detail;

std::vector<c10::SymInt> to_vector(c10::SymIntArrayRef values) { return {values.begin(), values.end()}; }

// The input of a spike synapse as its node keeps it: bits, and on CUDA the flag pack_spikes set for
// a value other than 0 and 1 (on the CPU pack_spikes raised at once).
struct PackedInput {
  SavedVariable bits, invalid;
  std::vector<c10::SymInt> size, stride;
  at::ScalarType dtype = at::kFloat;
  std::string layer;

  void pack(const at::Tensor& input, std::string layer_name) {
    layer = std::move(layer_name);
    auto [packed, flag] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return detail::call_pack_spikes(input, layer);
    }();
    bits = SavedVariable(packed, false);
    if (input.device().type() != c10::DeviceType::CPU) invalid = SavedVariable(flag, false);
    size = to_vector(input.sym_sizes());
    const auto strides = detail::packed_strides(input);
    stride.assign(strides.begin(), strides.end());
    dtype = input.scalar_type();
  }

  // The input's values; with values=false a tensor of its layout whose values are never read.
  at::Tensor unpack(bool values) {
    const at::Tensor b = bits.unpack();
    if (!values) return at::empty_strided_symint(size, stride, b.options().dtype(dtype));
    const at::Tensor flag = invalid.unpack();
    return detail::call_unpack_spikes(
        b, flag.defined() ? std::optional<at::Tensor>(flag) : std::nullopt, size, stride, dtype, layer);
  }

  void reset() {
    bits.reset_data();
    invalid.reset_data();
  }

  void refuse_double_backward() const {
    TORCH_CHECK(
        !at::GradMode::is_enabled(), layer,
        " with spike_input=True: double backward (create_graph=True, which torch.func's grad, vjp and jacrev "
        "always ask for) is not supported; construct the layer with spike_input=False for them");
  }
};

// Linear: grad_input = grad @ W, grad_weight = grad^T @ x, grad_bias = grad summed to [O] (AddmmBackward0's
// calls for addmm(bias, x, W^T): W^T is column-major).
struct SpikeLinearBackward final : torch::autograd::Node {
  PackedInput input;
  SavedVariable weight;
  bool has_bias = false;

  std::string name() const override { return "SpikeLinearBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input.reset();
    weight.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return {{}, {}, {}};
    input.refuse_double_backward();
    const bool need_input = task_should_compute_output(0), need_weight = task_should_compute_output(1);
    const bool need_bias = has_bias && task_should_compute_output(2);
    const auto rows = [](const at::Tensor& t) { return t.dim() == 1 ? t.unsqueeze(0) : t.flatten(0, -2); };
    const at::Tensor grad = rows(grads[0]);
    at::Tensor grad_input, grad_weight, grad_bias;
    if (need_input) grad_input = grad.mm(weight.unpack()).view_symint(input.size);
    if (need_weight) grad_weight = grad.t().mm(rows(input.unpack(true)));
    if (need_bias) grad_bias = at::sum_to(grad, {grad.sym_size(1)});
    return {grad_input, grad_weight, grad_bias};
  }
};

// The gradient of at::pad(x, pad, mode) for its input x [N, C, ...]: each padded position's source
// index comes from padding the indices themselves (0 marks a zero-padded position), then the
// gradient is summed into its sources. One call for every mode and rank.
at::Tensor pad_backward(const at::Tensor& grad, const at::Tensor& x, const detail::ConvSpec& spec) {
  const int64_t dims = x.dim() - 2;
  c10::SymDimVector spatial(x.sym_sizes().begin() + 2, x.sym_sizes().end());
  c10::SymInt count = 1;
  for (const auto& s : spatial) count = count * s;
  const bool pairs = spec.padding.size() == static_cast<size_t>(2 * dims);
  c10::SymDimVector pad(2 * dims);
  for (const auto d : c10::irange(dims)) {  // last dimension first, as fold_and_pad pads
    pad[2 * (dims - 1 - d)] = pairs ? spec.padding[2 * d] : spec.padding[d];
    pad[2 * (dims - 1 - d) + 1] = pairs ? spec.padding[2 * d + 1] : spec.padding[d];
  }
  c10::SymDimVector index_shape{1, 1};
  index_shape.append(spatial.begin(), spatial.end());
  const at::Tensor positions = at::arange(1, c10::Scalar(count + 1), grad.options().dtype(at::kDouble)).view_symint(index_shape);
  const at::Tensor index =
      at::pad_symint(positions, pad, spec.padding_mode == "zeros" ? "constant" : spec.padding_mode, 0.0)
          .flatten()
          .to(at::kLong);
  return at::zeros_symint({x.sym_size(0), x.sym_size(1), count + 1}, grad.options())
      .index_add_(2, index, grad.flatten(2))
      .narrow_symint(2, 1, count)
      .reshape_symint(x.sym_sizes());
}

// Convolutions, plain and transposed: at::convolution_backward on the folded (and padded) input.
struct SpikeConvBackward final : torch::autograd::Node {
  PackedInput input;
  SavedVariable weight;
  bool has_bias = false, transposed = false;
  std::vector<c10::SymInt> stride, padding, dilation, output_padding;
  std::optional<std::vector<c10::SymInt>> output_size;
  c10::SymInt groups = 1;
  std::string padding_mode;

  std::string name() const override { return "SpikeConvBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input.reset();
    weight.reset_data();
  }

  detail::ConvSpec spec() const {
    if (!transposed) return detail::make_conv_spec(stride, padding, dilation, groups, padding_mode);
    return detail::make_conv_transpose_spec(
        stride, padding, output_padding, groups, dilation,
        output_size.has_value() ? at::OptionalSymIntArrayRef(*output_size) : std::nullopt);
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return {{}, {}, {}};
    input.refuse_double_backward();
    const bool need_input = task_should_compute_output(0), need_weight = task_should_compute_output(1);
    const bool need_bias = has_bias && task_should_compute_output(2);
    const at::Tensor w = weight.unpack();
    const at::Tensor x = input.unpack(need_weight);
    const detail::ConvSpec s = spec();
    const detail::FoldedConv folded = detail::fold_and_pad(x, w, s);
    const at::Tensor grad = folded.time_batch.has_value() ? grads[0].flatten(0, 1) : grads[0];
    const c10::SymDimVector bias_sizes{transposed ? w.sym_size(1) * groups : w.sym_size(0)};
    auto [grad_input, grad_weight, grad_bias] = at::convolution_backward_symint(
        grad, folded.input, w, need_bias ? at::OptionalSymIntArrayRef(bias_sizes) : std::nullopt, stride,
        folded.padding, dilation, transposed, folded.output_padding, groups, {need_input, need_weight, need_bias});
    if (need_input) {
      const at::Tensor x_folded = folded.time_batch.has_value() ? x.flatten(0, 1) : x;
      if (folded.input.sym_sizes() != x_folded.sym_sizes()) grad_input = pad_backward(grad_input, x_folded, s);
      if (folded.time_batch.has_value()) grad_input = grad_input.unflatten_symint(0, *folded.time_batch);
    }
    return {grad_input, need_weight ? grad_weight : at::Tensor(), need_bias ? grad_bias : at::Tensor()};
  }
};

at::Tensor spike_linear_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (torch::autograd::isFwGradDefined(input) || torch::autograd::isFwGradDefined(weight) ||
      torch::autograd::isFwGradDefined(bias)) {
    return detail::checked_linear(input, weight, bias);  // ATen's graph, as matterhorn::linear records
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::spike_linear", "")
                             .typed<decltype(detail::checked_linear)>();
  at::Tensor output = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias);
  }();
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) return output;
  auto node = detail::make_node<SpikeLinearBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  node->input.pack(input, "Linear");
  node->weight = SavedVariable(weight, false);
  node->has_bias = bias.has_value() && bias->defined();
  torch::autograd::set_history(output, node);
  return output;
}

// Records the node of a convolution whose forward gave `output`.
void record_conv(
    at::Tensor& output, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const detail::ConvSpec& spec) {
  auto node = detail::make_node<SpikeConvBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  node->input.pack(input, c10::str(detail::conv_layer_name(weight, spec.transposed)));
  node->weight = SavedVariable(weight, false);
  node->has_bias = bias.has_value() && bias->defined();
  node->transposed = spec.transposed;
  node->stride = to_vector(spec.stride);
  node->padding = to_vector(spec.padding);
  node->dilation = to_vector(spec.dilation);
  node->output_padding = to_vector(spec.output_padding);
  if (spec.output_size.has_value()) node->output_size = to_vector(*spec.output_size);
  node->groups = spec.groups;
  node->padding_mode = std::string(spec.padding_mode);
  torch::autograd::set_history(output, node);
}

at::Tensor spike_conv_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, c10::SymInt groups,
    c10::string_view padding_mode) {
  if (torch::autograd::isFwGradDefined(input) || torch::autograd::isFwGradDefined(weight) ||
      torch::autograd::isFwGradDefined(bias)) {
    return detail::conv_kernel(input, weight, bias, stride, padding, dilation, groups, padding_mode);
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::spike_conv", "")
                             .typed<decltype(detail::conv_kernel)>();
  at::Tensor output = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, stride, padding, dilation, groups, padding_mode);
  }();
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) return output;
  record_conv(output, input, weight, bias, detail::make_conv_spec(stride, padding, dilation, groups, padding_mode));
  return output;
}

at::Tensor spike_conv_transpose_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, c10::SymIntArrayRef dilation, at::OptionalSymIntArrayRef output_size) {
  if (torch::autograd::isFwGradDefined(input) || torch::autograd::isFwGradDefined(weight) ||
      torch::autograd::isFwGradDefined(bias)) {
    return detail::conv_transpose_kernel(input, weight, bias, stride, padding, output_padding, groups, dilation,
                                         output_size);
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::spike_conv_transpose", "")
                             .typed<decltype(detail::conv_transpose_kernel)>();
  at::Tensor output = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(input, weight, bias, stride, padding, output_padding, groups, dilation, output_size);
  }();
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) return output;
  record_conv(
      output, input, weight, bias,
      detail::make_conv_transpose_spec(stride, padding, output_padding, groups, dilation, output_size));
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("spike_linear", &spike_linear_autograd);
  m.impl("spike_conv", &spike_conv_autograd);
  m.impl("spike_conv_transpose", &spike_conv_transpose_autograd);
}
