#pragma once
// Synapses whose input is spikes (only 0 and 1): the same forward and gradients as linear, conv and
// conv_transpose, but the input is kept for backward as 1 bit per value (pack_spikes) and unpacked
// only when the weight gradient needs it. A value other than 0 and 1 is a c10::ValueError: at once
// on the CPU, at backward on CUDA (the pack kernel sets a flag on the device; the backward reads it).
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/macros/Export.h>
#include <c10/util/OptionalArrayRef.h>

namespace matterhorn::ops {

// matterhorn::spike_linear: as linear (ops/linear.h).
C10_EXPORT at::Tensor spike_linear(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias = std::nullopt);

// matterhorn::spike_conv: as conv (ops/conv.h).
C10_EXPORT at::Tensor spike_conv(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups = 1,
    std::string_view padding_mode = "zeros");

// matterhorn::spike_conv_transpose: as conv_transpose (ops/conv.h).
C10_EXPORT at::Tensor spike_conv_transpose(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, at::OptionalIntArrayRef output_size = std::nullopt);

// The bits of a 0/1 tensor in memory order (bit k % 8 of byte k / 8) and a uint8 flag, set if the
// input held another value (on the CPU that is raised instead).
C10_EXPORT std::tuple<at::Tensor, at::Tensor> pack_spikes(const at::Tensor& input);

// The tensor pack_spikes packed, given its size, stride and dtype; a set flag raises.
C10_EXPORT at::Tensor unpack_spikes(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, at::IntArrayRef size, at::IntArrayRef stride,
    at::ScalarType dtype);

}  // namespace matterhorn::ops
