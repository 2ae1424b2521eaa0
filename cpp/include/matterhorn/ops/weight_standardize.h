#pragma once
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/macros/Export.h>

namespace matterhorn::ops {

// The effective weight of WSLinear / WSConvNd (matterhorn 2.0.0's): per output channel o, over
// every other dimension of weight [O, ...] (K = fan_in values),
//   (w - mean) / (sqrt(var_unbiased * K) + eps) * gamma[o] + beta[o]
// with mean and var constants to autograd. gamma, beta: [O] or absent (1 and 0). Calls
// matterhorn::weight_standardize: differentiable, on any device the library was built for.
C10_EXPORT at::Tensor weight_standardize(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma = std::nullopt,
    const std::optional<at::Tensor>& beta = std::nullopt, double eps = 1e-6);

}  // namespace matterhorn::ops
