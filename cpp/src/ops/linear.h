#pragma once
// Internal pieces of the matterhorn::linear op shared by its kernels (CPU, CUDA, Meta, Autograd).
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

namespace matterhorn::ops::detail {

// Raises ValueError/TypeError naming the Linear layer and the shapes in [T, B, ...] terms.
void check_linear_arguments(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// Sizes of the output: the input's with the last one replaced by out_features.
c10::SymDimVector linear_output_sizes(const at::Tensor& input, const at::Tensor& weight);

// The forward computation on any device with ATen: one GEMM over the folded rows.
// Expects checked arguments.
at::Tensor linear_folded(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// Checks, then linear_folded: the op's kernel on every backend and above autograd (linear.cpp).
inline at::Tensor checked_linear(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_arguments(input, weight, bias);
  return linear_folded(input, weight, bias);
}

}  // namespace matterhorn::ops::detail
