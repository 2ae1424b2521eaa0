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
#include <utility>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include "matterhorn/snn/conv.h"
#include "matterhorn/snn/linear.h"

namespace matterhorn::snn {

// A setter of Base's (a TORCH_ARG) that returns the derived options, so that a chain such as
// WSConv2dOptions(3, 8, 3).padding(1).eps(1e-5) goes on to the WS arguments; the getters are Base's.
#define MATTERHORN_BASE_ARG(T, name)                  \
  using Base::name;                                   \
  auto name(const T& value) -> decltype(*this) {      \
    Base::name(value);                                \
    return *this;                                     \
  }                                                   \
  auto name(T&& value) -> decltype(*this) {           \
    Base::name(std::move(value));                     \
    return *this;                                     \
  }

// LinearOptions (spike_input included), then affine and eps.
struct C10_EXPORT WSLinearOptions : LinearOptions {
  using Base = LinearOptions;
  WSLinearOptions(int64_t in_features, int64_t out_features) : Base(in_features, out_features) {}
  MATTERHORN_BASE_ARG(int64_t, in_features)
  MATTERHORN_BASE_ARG(int64_t, out_features)
  MATTERHORN_BASE_ARG(bool, bias)
  MATTERHORN_BASE_ARG(bool, spike_input)
  // The linear layer's own options.
  const LinearOptions& linear() const { return *this; }
  TORCH_ARG(bool, affine) = true;  // gamma trained
  TORCH_ARG(double, eps) = 1e-6;
};

// ConvOptions (the page's order, spike_input included), then affine and eps.
template <size_t D>
struct WSConvOptions : ConvOptions<D> {
  using Base = ConvOptions<D>;
  using padding_t = typename Base::padding_t;
  using padding_mode_t = typename Base::padding_mode_t;

  WSConvOptions(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
      : Base(in_channels, out_channels, kernel_size) {}
  MATTERHORN_BASE_ARG(int64_t, in_channels)
  MATTERHORN_BASE_ARG(int64_t, out_channels)
  MATTERHORN_BASE_ARG(torch::ExpandingArray<D>, kernel_size)
  MATTERHORN_BASE_ARG(torch::ExpandingArray<D>, stride)
  MATTERHORN_BASE_ARG(padding_t, padding)
  MATTERHORN_BASE_ARG(torch::ExpandingArray<D>, dilation)
  MATTERHORN_BASE_ARG(int64_t, groups)
  MATTERHORN_BASE_ARG(bool, bias)
  MATTERHORN_BASE_ARG(padding_mode_t, padding_mode)
  MATTERHORN_BASE_ARG(bool, spike_input)
  // The convolution's own options.
  const ConvOptions<D>& conv() const { return *this; }
  TORCH_ARG(bool, affine) = true;  // gamma trained
  TORCH_ARG(double, eps) = 1e-6;
};

#undef MATTERHORN_BASE_ARG

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
