#pragma once
// matterhorn::snn::WSLinear and WSConv1d/2d/3d: the C++ twins of the Python classes (matterhorn
// 2.0.0's weight-standardised layers). Linear / ConvNd whose weight is standardised per output
// channel before each call (ops::weight_standardize), with parameters gamma [out] (ones, trained
// iff affine) and beta [out] (zeros, never trained); state keys weight, bias, gamma, beta.
//
//   matterhorn::snn::WSConv2d conv(matterhorn::snn::WSConv2dOptions(3, 8, 3).padding(1).eps(1e-5));
//   at::Tensor y = conv(x);  // [T, B, 3, H, W] -> [T, B, 8, H, W], or [B, 3, H, W] -> [B, 8, H, W]
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include "matterhorn/snn/conv.h"
#include "matterhorn/snn/linear.h"

namespace matterhorn::snn {

struct C10_EXPORT WSLinearOptions {
  WSLinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, affine) = true;  // gamma trained
  TORCH_ARG(double, eps) = 1e-6;
};

// ConvOptions' arguments (the page's order) and affine, eps.
template <size_t D>
struct WSConvOptions {
  using padding_t = typename ConvOptions<D>::padding_t;
  using padding_mode_t = typename ConvOptions<D>::padding_mode_t;

  WSConvOptions(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
      : in_channels_(in_channels), out_channels_(out_channels), kernel_size_(kernel_size) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(torch::ExpandingArray<D>, kernel_size);
  TORCH_ARG(torch::ExpandingArray<D>, stride) = 1;
  TORCH_ARG(padding_t, padding) = 0;
  TORCH_ARG(torch::ExpandingArray<D>, dilation) = 1;
  TORCH_ARG(int64_t, groups) = 1;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(padding_mode_t, padding_mode) = torch::kZeros;
  TORCH_ARG(bool, affine) = true;  // gamma trained
  TORCH_ARG(double, eps) = 1e-6;

 public:  // TORCH_ARG leaves the section private
  // The convolution's own options.
  ConvOptions<D> conv() const {
    return ConvOptions<D>(in_channels(), out_channels(), kernel_size())
        .stride(stride())
        .padding(padding())
        .dilation(dilation())
        .groups(groups())
        .bias(bias())
        .padding_mode(padding_mode());
  }
};

class C10_EXPORT WSLinearImpl : public torch::nn::Cloneable<WSLinearImpl> {
 public:
  WSLinearImpl(int64_t in_features, int64_t out_features)
      : WSLinearImpl(WSLinearOptions(in_features, out_features)) {}
  explicit WSLinearImpl(WSLinearOptions options);

  // Creates the parameters: weight and bias as torch.nn.Linear's, gamma ones, beta zeros.
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // The weight the layer computes with.
  at::Tensor standardized_weight() const;
  // [T, B, ..., in_features] -> [T, B, ..., out_features] in one folded GEMM.
  at::Tensor forward(const at::Tensor& input);

  WSLinearOptions options;
  at::Tensor weight;  // [out_features, in_features]
  at::Tensor bias;    // [out_features], undefined without bias
  at::Tensor gamma;   // [out_features]
  at::Tensor beta;    // [out_features]
};

template <size_t D>
class C10_EXPORT WSConvImpl : public torch::nn::Cloneable<WSConvImpl<D>> {
 public:
  WSConvImpl(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
      : WSConvImpl(WSConvOptions<D>(in_channels, out_channels, kernel_size)) {}
  explicit WSConvImpl(WSConvOptions<D> options);

  // Creates the parameters: weight and bias as torch.nn's ConvNd, gamma ones, beta zeros.
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  at::Tensor standardized_weight() const;
  // [T, B, C_in, ...] -> [T, B, C_out, ...] (or one step [B, C_in, ...]) in one folded call.
  at::Tensor forward(const at::Tensor& input);

  WSConvOptions<D> options;
  at::Tensor weight;  // [C_out, C_in / groups, k...]
  at::Tensor bias;    // [C_out], undefined without bias
  at::Tensor gamma;   // [C_out]
  at::Tensor beta;    // [C_out]

 private:
  std::vector<int64_t> padding_;  // per spatial dimension, or (before, after) pairs for 'same'
  std::string padding_mode_;      // "zeros", "reflect", ...
};

using WSConv1dOptions = WSConvOptions<1>;
using WSConv2dOptions = WSConvOptions<2>;
using WSConv3dOptions = WSConvOptions<3>;
using WSConv1dImpl = WSConvImpl<1>;
using WSConv2dImpl = WSConvImpl<2>;
using WSConv3dImpl = WSConvImpl<3>;
TORCH_MODULE(WSLinear);
TORCH_MODULE(WSConv1d);
TORCH_MODULE(WSConv2d);
TORCH_MODULE(WSConv3d);

extern template class WSConvImpl<1>;
extern template class WSConvImpl<2>;
extern template class WSConvImpl<3>;

}  // namespace matterhorn::snn
