#pragma once
// Parameter initialisation shared by the C++ modules: exactly torch.nn's for Linear and ConvNd.
#include <cmath>

#include <ATen/core/Tensor.h>
#include <torch/nn/init.h>

namespace matterhorn::snn::detail {

// weight ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias the same bound.
inline void init_like_torch_nn(at::Tensor& weight, at::Tensor& bias) {
  // an empty weight (in_features = 0) has a fan_in of 0, hence an infinite bound: torch.nn skips it
  if (weight.numel() > 0) torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const auto fan_in = std::get<0>(torch::nn::init::_calculate_fan_in_and_fan_out(weight));
    const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

}  // namespace matterhorn::snn::detail
