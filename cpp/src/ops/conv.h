#pragma once
// Internal pieces of the matterhorn::conv and matterhorn::conv_transpose ops, shared by
// Conv1d/2d/3d and ConvTranspose1d/2d/3d and by every dispatch key. The computation is always:
// fold [T, B, C, ...] to [T*B, C, ...] (a view), pad when the mode or 'same' asks for it,
// one at::convolution (oneDNN / cuDNN), unfold. A kernel differs only in how it convolves.
#include <optional>
#include <string>
#include <string_view>

#include <ATen/core/Tensor.h>
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

// The spec of a convolution / a transposed convolution from the ops' arguments (the schemas' order).
ConvSpec make_conv_spec(
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, c10::SymInt groups,
    std::string_view padding_mode);
ConvSpec make_conv_transpose_spec(
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef output_padding, c10::SymInt groups,
    c10::SymIntArrayRef dilation, at::OptionalSymIntArrayRef output_size);

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
  bool unbatched = false;                // [C, ...] input, convolved as a batch of one
};
FoldedConv fold_and_pad(const at::Tensor& input, const at::Tensor& weight, const ConvSpec& spec);

// Unfolds at::convolution's output back to [T, B, C, ...] (multi-step) or [C, ...] (unbatched).
at::Tensor unfold_output(const at::Tensor& output, const FoldedConv& folded);

// The kernels, with the ops' schemas: checks, fold, pad, one at::convolution, unfold.
at::Tensor conv_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
    c10::SymInt groups, c10::string_view padding_mode);
at::Tensor conv_transpose_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, c10::SymIntArrayRef dilation, at::OptionalSymIntArrayRef output_size);

}  // namespace matterhorn::ops::detail
