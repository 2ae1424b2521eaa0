#pragma once
// matterhorn::snn::Conv1d/2d/3d and ConvTranspose1d/2d/3d: the C++ twins of the Python classes,
// in the torch::nn style, one template per family for the three dimensionalities.
//
//   matterhorn::snn::Conv2d conv(matterhorn::snn::Conv2dOptions(3, 8, 3).padding(1));
//   at::Tensor y = conv(x);  // [T, B, 3, H, W] -> [T, B, 8, H, W], or [B, 3, H, W] -> [B, 8, H, W]
#include <cstddef>
#include <cstdint>
#include <optional>
#include <ostream>
#include <variant>

#include <c10/util/OptionalArrayRef.h>
#include <torch/arg.h>
#include <torch/enum.h>
#include <torch/expanding_array.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/options/conv.h>
#include <torch/nn/pimpl.h>


namespace matterhorn::snn {

template <size_t D>
struct ConvOptions {
  using padding_t = torch::nn::detail::conv_padding_t<D>;  // sizes, torch::kValid or torch::kSame
  using padding_mode_t = torch::nn::detail::conv_padding_mode_t;

  ConvOptions(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
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
  // The input is spikes (0 and 1), kept for backward as bits (matterhorn/ops/spike.h).
  TORCH_ARG(bool, spike_input) = false;
};

template <size_t D>
struct ConvTransposeOptions {
  ConvTransposeOptions(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
      : in_channels_(in_channels), out_channels_(out_channels), kernel_size_(kernel_size) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(torch::ExpandingArray<D>, kernel_size);
  TORCH_ARG(torch::ExpandingArray<D>, stride) = 1;
  TORCH_ARG(torch::ExpandingArray<D>, padding) = 0;
  TORCH_ARG(torch::ExpandingArray<D>, output_padding) = 0;
  TORCH_ARG(int64_t, groups) = 1;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(torch::ExpandingArray<D>, dilation) = 1;
  // The input is spikes (0 and 1), kept for backward as bits (matterhorn/ops/spike.h).
  TORCH_ARG(bool, spike_input) = false;
};

template <size_t D>
class C10_EXPORT ConvImpl : public torch::nn::Cloneable<ConvImpl<D>> {
 public:
  ConvImpl(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
      : ConvImpl(ConvOptions<D>(in_channels, out_channels, kernel_size)) {}
  explicit ConvImpl(ConvOptions<D> options);

  // Creates the parameters and initialises them as torch.nn does.
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // [T, B, C_in, ...] -> [T, B, C_out, ...] (or one step [B, C_in, ...]) in one folded call.
  at::Tensor forward(const at::Tensor& input);

  ConvOptions<D> options;
  at::Tensor weight;  // [C_out, C_in / groups, k...]
  at::Tensor bias;    // [C_out], undefined without bias
};

template <size_t D>
class C10_EXPORT ConvTransposeImpl : public torch::nn::Cloneable<ConvTransposeImpl<D>> {
 public:
  ConvTransposeImpl(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
      : ConvTransposeImpl(ConvTransposeOptions<D>(in_channels, out_channels, kernel_size)) {}
  explicit ConvTransposeImpl(ConvTransposeOptions<D> options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // output_size (spatial sizes or the whole output shape) picks output_padding, as in torch.nn.
  at::Tensor forward(const at::Tensor& input, at::OptionalIntArrayRef output_size = std::nullopt);

  ConvTransposeOptions<D> options;
  at::Tensor weight;  // [C_in, C_out / groups, k...]
  at::Tensor bias;    // [C_out], undefined without bias

 protected:
  // output_size may be left out when the module sits in a torch::nn::Sequential (an AnyModule).
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(at::OptionalIntArrayRef())})
};

using Conv1dOptions = ConvOptions<1>;
using Conv2dOptions = ConvOptions<2>;
using Conv3dOptions = ConvOptions<3>;
using ConvTranspose1dOptions = ConvTransposeOptions<1>;
using ConvTranspose2dOptions = ConvTransposeOptions<2>;
using ConvTranspose3dOptions = ConvTransposeOptions<3>;
using Conv1dImpl = ConvImpl<1>;
using Conv2dImpl = ConvImpl<2>;
using Conv3dImpl = ConvImpl<3>;
using ConvTranspose1dImpl = ConvTransposeImpl<1>;
using ConvTranspose2dImpl = ConvTransposeImpl<2>;
using ConvTranspose3dImpl = ConvTransposeImpl<3>;
TORCH_MODULE(Conv1d);
TORCH_MODULE(Conv2d);
TORCH_MODULE(Conv3d);
TORCH_MODULE(ConvTranspose1d);
TORCH_MODULE(ConvTranspose2d);
TORCH_MODULE(ConvTranspose3d);

extern template class ConvImpl<1>;
extern template class ConvImpl<2>;
extern template class ConvImpl<3>;
extern template class ConvTransposeImpl<1>;
extern template class ConvTransposeImpl<2>;
extern template class ConvTransposeImpl<3>;

}  // namespace matterhorn::snn
