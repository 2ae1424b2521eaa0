// matterhorn::spike_linear, spike_conv and spike_conv_transpose: the synapses with spike_input=True.
// Same arguments, checks and forward as linear / conv / conv_transpose (their kernels serve every
// backend here too); only the Autograd kernel differs (autograd/spike_synapse_autograd.cpp): it
// keeps the input for backward as bits (pack_spikes) instead of a dense copy.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "matterhorn/ops/spike.h"
#include "ops/conv.h"
#include "ops/linear.h"

namespace matterhorn::ops {

at::Tensor spike_linear(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::spike_linear", "")
                             .typed<decltype(spike_linear)>();
  return op.call(input, weight, bias);
}

at::Tensor spike_conv(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::string_view padding_mode) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::spike_conv", "")
                             .typed<decltype(detail::conv_kernel)>();
  return op.call(
      input, weight, bias, c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding),
      c10::fromIntArrayRefSlow(dilation), groups, padding_mode);
}

at::Tensor spike_conv_transpose(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, at::OptionalIntArrayRef output_size) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::spike_conv_transpose", "")
                             .typed<decltype(detail::conv_transpose_kernel)>();
  at::OptionalSymIntArrayRef sym_output_size;
  if (output_size.has_value()) sym_output_size = c10::fromIntArrayRefSlow(*output_size);
  return op.call(
      input, weight, bias, c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding),
      c10::fromIntArrayRefSlow(output_padding), groups, c10::fromIntArrayRefSlow(dilation), sym_output_size);
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def("spike_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def(
      "spike_conv(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
      "SymInt[] dilation, SymInt groups, str padding_mode=\"zeros\") -> Tensor");
  m.def(
      "spike_conv_transpose(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, "
      "SymInt[] padding, SymInt[] output_padding, SymInt groups, SymInt[] dilation, "
      "SymInt[]? output_size=None) -> Tensor");
}

// Forward on every backend (below autograd): the dense ops' kernels.
TORCH_LIBRARY_IMPL(matterhorn, CompositeExplicitAutograd, m) {
  m.impl("spike_linear", &matterhorn::ops::detail::checked_linear);
  m.impl("spike_conv", &matterhorn::ops::detail::conv_kernel);
  m.impl("spike_conv_transpose", &matterhorn::ops::detail::conv_transpose_kernel);
}
