#pragma once
#include <optional>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/macros/Export.h>
#include <c10/util/OptionalArrayRef.h>

namespace matterhorn::ops {

// Time-folded convolution with 1 to 3 spatial dimensions (from the weight's rank):
// input [T, B, C_in, ...] (multi-step) or [B, C_in, ...] (single-step) -> [T, B, C_out, ...] or
// [B, C_out, ...], computed as one convolution over the folded [T*B, C_in, ...] view.
// `padding` holds one value per spatial dimension (both sides) or two (before, after);
// `padding_mode` is "zeros", "reflect", "replicate" or "circular". Calls matterhorn::conv.
C10_EXPORT at::Tensor conv(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups = 1,
    std::string_view padding_mode = "zeros");

// Time-folded transposed convolution (matterhorn::conv_transpose). `output_size` (spatial sizes
// or the whole output shape), when given, chooses output_padding as torch.nn does.
C10_EXPORT at::Tensor conv_transpose(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
    int64_t groups, at::IntArrayRef dilation, at::OptionalIntArrayRef output_size = std::nullopt);

// padding='same' as explicit (before, after) pairs per spatial dimension: the total
// dilation * (kernel - 1) split in two, the odd element after.
C10_EXPORT std::vector<int64_t> same_padding(at::IntArrayRef kernel_size, at::IntArrayRef dilation);

}  // namespace matterhorn::ops
