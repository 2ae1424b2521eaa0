#pragma once
// Internal pieces of the weight standardisation ops (WSLinear, WSConv1d/2d/3d). The weight
// [O, ...] is viewed as O rows of K = fan_in values (the product of its other sizes); per row o,
// as matterhorn 2.0.0:
//   out = (w - mean) * rstd * gamma[o] + beta[o],   rstd = 1 / (sqrt(var_unbiased * K) + eps)
// mean and rstd are constants to autograd (2.0.0 detaches them).
//
// Building-block ops (one kernel file per dispatch key, like LayerNorm's):
//   weight_standardize_forward(w, gamma, beta, eps)       -> out, mean [O], rstd [O] (differentiable)
//   weight_standardize_backward(dout, w, mean, rstd, gamma) -> dw, dgamma ([0] without gamma), dbeta [O]
// The op weight_standardize = weight_standardize_forward's output.
//
// Layout: when each output channel's K values are one dense block (contiguous weights, and also
// channels_last convolution weights), the kernels work on the weight's memory as it is and the
// output and dw have the weight's strides; any other layout is made contiguous first.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace matterhorn::ops::detail {

// Checks shared by every kernel of weight_standardize_forward (CPU, CUDA, Meta): a floating-point
// weight of 2 or more dimensions with K != 1 (an unbiased variance needs 2 values), gamma and beta
// absent or [O] of the weight's dtype and device, eps >= 0.
void check_weight_standardize(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps);

// weight_standardize_backward's checks: the forward's, grad_output like the weight, mean and rstd
// [O] in the accumulation type, on the weight's device.
void check_weight_standardize_backward(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma);

// True when each output channel's values are one dense block of K values: the kernels then use
// the memory as it is.
bool has_dense_rows(const at::Tensor& weight);

// An uninitialised tensor for the output (or dw): the weight's strides when it has dense rows,
// contiguous otherwise. The CPU, CUDA and Meta kernels all allocate through it.
at::Tensor empty_like_weight(const at::Tensor& weight);

// The forward and backward in ATen ops, for any device: the CUDA kernels, and the autograd
// paths that torch must differentiate further (forward-mode AD, create_graph=True backward).
// Differentiable in every tensor argument except mean and rstd, which are constants.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_forward_aten(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_backward_aten(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma);

// The building blocks through the dispatcher (below autograd when the caller excludes it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_weight_standardize_forward(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_weight_standardize_backward(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma);

}  // namespace matterhorn::ops::detail
