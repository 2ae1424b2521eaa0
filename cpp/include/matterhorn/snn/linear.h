#pragma once
// matterhorn::snn::Linear: the C++ twin of matterhorn_pytorch.snn.Linear, in the torch::nn style.
//
//   matterhorn::snn::Linear fc(matterhorn::snn::LinearOptions(784, 10).bias(false));
//   at::Tensor y = fc(x);  // [T, B, 784] -> [T, B, 10], or [B, 784] -> [B, 10]
#include <cstdint>
#include <ostream>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>


namespace matterhorn::snn {

struct C10_EXPORT LinearOptions {
  LinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  // The input is spikes (0 and 1), kept for backward as bits (matterhorn/ops/spike.h).
  TORCH_ARG(bool, spike_input) = false;
};

class C10_EXPORT LinearImpl : public torch::nn::Cloneable<LinearImpl> {
 public:
  LinearImpl(int64_t in_features, int64_t out_features)
      : LinearImpl(LinearOptions(in_features, out_features)) {}
  explicit LinearImpl(LinearOptions options);

  // Creates the parameters and initialises them as torch.nn.Linear does.
  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // [T, B, ..., in_features] -> [T, B, ..., out_features] in one folded GEMM.
  at::Tensor forward(const at::Tensor& input);

  LinearOptions options;
  at::Tensor weight;  // [out_features, in_features]
  at::Tensor bias;    // [out_features], undefined when options.bias() is false
};

TORCH_MODULE(Linear);

}  // namespace matterhorn::snn
