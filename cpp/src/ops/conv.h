#pragma once
// Internal pieces of the matterhorn::conv and matterhorn::conv_transpose ops, shared by
// Conv1d/2d/3d and ConvTranspose1d/2d/3d and by every dispatch key. The computation is always:
// fold [T, B, C, ...] to [T*B, C, ...] (a view), pad when the mode or 'same' asks for it,
// one at::convolution (oneDNN / cuDNN), unfold. A kernel differs only in how it convolves.
#include <optional>
#include <string>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <c10/core/SymIntArrayRef.h>

#include "ops/checks.h"

namespace matterhorn::ops::detail {

// Everything about a convolution but its tensors; sizes are per spatial dimension.
struct ConvSpec {
  bool transposed = false;
  c10::SymIntArrayRef stride;
  c10::SymIntArrayRef padding;  // N values (both sides) or 2N (before, after per dimension)
  c10::SymIntArrayRef dilation;
  c10::SymIntArrayRef output_padding;       // transposed only
  at::OptionalSymIntArrayRef output_size;   // transposed only: wins over output_padding
  c10::SymInt groups = 1;
  std::string_view padding_mode = "zeros";  // zeros | reflect | replicate | circular
};

// "Conv2d", "ConvTranspose3d", ... from the weight's rank.
LayerName conv_layer_name(const at::Tensor& weight, bool transposed);

// Raises ValueError/TypeError naming the layer, the accepted shapes in both modes and the
// input's shape in the user's terms ([T, B, C, H, W], never the folded T*B).
void check_conv_arguments(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const ConvSpec& spec);

// The folded, padded input and the arguments for at::convolution on it.
struct FoldedConv {
  at::Tensor input;                      // [T*B, C, ...] or [B, C, ...], padded if needed
  c10::SymDimVector padding;             // what at::convolution still pads (symmetric zeros)
  c10::SymDimVector output_padding;      // resolved from output_size for transposed convs
  std::optional<c10::SymDimVector> time_batch;  // {T, B} when the input was multi-step
};
FoldedConv fold_and_pad(const at::Tensor& input, const at::Tensor& weight, const ConvSpec& spec);

// Unfolds at::convolution's output back to [T, B, C, ...] when the input was multi-step.
at::Tensor unfold_output(const at::Tensor& output, const FoldedConv& folded);

// How a kernel convolves the folded tensor: at::convolution (CPU, Meta, Autograd), or with a
// device guard first (CUDA). Both share the signature of at::convolution_symint.
using Convolve = at::Tensor (*)(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
    bool transposed, c10::SymIntArrayRef output_padding, c10::SymInt groups);

inline at::Tensor aten_convolution(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
    bool transposed, c10::SymIntArrayRef output_padding, c10::SymInt groups) {
  return at::convolution_symint(
      input, weight, bias, stride, padding, dilation, transposed, output_padding, std::move(groups));
}

inline at::Tensor run_conv(
    Convolve convolve, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const ConvSpec& spec) {
  check_conv_arguments(input, weight, bias, spec);
  const FoldedConv folded = fold_and_pad(input, weight, spec);
  return unfold_output(
      convolve(folded.input, weight, bias, spec.stride, folded.padding, spec.dilation,
               spec.transposed, folded.output_padding, spec.groups),
      folded);
}

// Kernels with the ops' schemas, parameterised by how they convolve.
template <Convolve convolve>
at::Tensor conv_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
    c10::SymInt groups, c10::string_view padding_mode) {
  ConvSpec spec;
  spec.stride = stride;
  spec.padding = padding;
  spec.dilation = dilation;
  spec.groups = std::move(groups);
  spec.padding_mode = padding_mode;
  return run_conv(convolve, input, weight, bias, spec);
}

template <Convolve convolve>
at::Tensor conv_transpose_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, c10::SymIntArrayRef dilation, at::OptionalSymIntArrayRef output_size) {
  ConvSpec spec;
  spec.transposed = true;
  spec.stride = stride;
  spec.padding = padding;
  spec.output_padding = output_padding;
  spec.output_size = output_size;
  spec.groups = std::move(groups);
  spec.dilation = dilation;
  return run_conv(convolve, input, weight, bias, spec);
}

}  // namespace matterhorn::ops::detail
