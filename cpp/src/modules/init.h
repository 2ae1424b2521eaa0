#pragma once
// Parameter initialisation shared by the C++ modules: exactly torch.nn's for Linear and ConvNd.
#include <cmath>

#include <ATen/core/Tensor.h>
#include <torch/nn/init.h>

namespace matterhorn::snn::detail {

// weight ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias the same bound.
inline void init_like_torch_nn(at::Tensor& weight, at::Tensor& bias) {
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const auto fan_in = std::get<0>(torch::nn::init::_calculate_fan_in_and_fan_out(weight));
    const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

}  // namespace matterhorn::snn::detail
