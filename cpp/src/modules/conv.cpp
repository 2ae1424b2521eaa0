#include "matterhorn/snn/conv.h"

#include <string>
#include <vector>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "modules/init.h"
#include "modules/synapse_call.h"

namespace matterhorn::snn {
namespace {

std::string layer_name(const char* family, size_t dims) { return c10::str(family, dims, "d"); }

template <size_t D>
void check_at_least(const std::string& layer, const char* what, const torch::ExpandingArray<D>& values, int64_t minimum) {
  for (const int64_t value : *values) {
    TORCH_CHECK_VALUE(value >= minimum, layer, ": ", what, " must be >= ", minimum, ", got ", values);
  }
}

void check_channels(const std::string& layer, int64_t in_channels, int64_t out_channels, int64_t groups) {
  TORCH_CHECK_VALUE(
      in_channels >= 1 && out_channels >= 1, layer, ": in_channels and out_channels must be >= 1, got ",
      in_channels, " and ", out_channels);
  TORCH_CHECK_VALUE(groups >= 1, layer, ": groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(
      in_channels % groups == 0 && out_channels % groups == 0, layer,
      ": in_channels and out_channels must be divisible by groups; got ", in_channels, ", ",
      out_channels, " and groups=", groups);
}

// Registers weight [leading, second, k...] and bias [bias_size] (or none) and initialises them.
template <size_t D>
void create_parameters(
    torch::nn::Module& module, at::Tensor& weight, at::Tensor& bias, int64_t leading, int64_t second,
    const torch::ExpandingArray<D>& kernel_size, bool with_bias, int64_t bias_size) {
  std::vector<int64_t> shape{leading, second};
  shape.insert(shape.end(), kernel_size->begin(), kernel_size->end());
  weight = module.register_parameter("weight", at::empty(shape));
  bias = with_bias ? module.register_parameter("bias", at::empty({bias_size}))
                   : module.register_parameter("bias", {}, /*requires_grad=*/false);
  detail::init_like_torch_nn(weight, bias);
}

}  // namespace

template <size_t D>
ConvImpl<D>::ConvImpl(ConvOptions<D> options_) : options(std::move(options_)) {
  const std::string name = layer_name("Conv", D);
  check_channels(name, options.in_channels(), options.out_channels(), options.groups());
  check_at_least<D>(name, "kernel_size", options.kernel_size(), 1);
  check_at_least<D>(name, "stride", options.stride(), 1);
  check_at_least<D>(name, "dilation", options.dilation(), 1);
  if (const auto* sizes = std::get_if<torch::ExpandingArray<D>>(&options.padding())) {
    check_at_least<D>(name, "padding", *sizes, 0);
  } else if (std::holds_alternative<torch::enumtype::kSame>(options.padding())) {
    for (const int64_t stride : *options.stride()) {
      TORCH_CHECK_VALUE(stride == 1, name, ": padding='same' is not supported for strided convolutions");
    }
  }
  ConvImpl<D>::reset();
}

template <size_t D>
void ConvImpl<D>::reset() {
  create_parameters<D>(
      *this, weight, bias, options.out_channels(), options.in_channels() / options.groups(),
      options.kernel_size(), options.bias(), options.out_channels());
}

template <size_t D>
void ConvImpl<D>::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::Conv" << D << "d(";
  detail::print_conv_arguments<D>(stream, options);
  stream << (options.spike_input() ? ", spike_input=true" : "") << ")";
}

template <size_t D>
at::Tensor ConvImpl<D>::forward(const at::Tensor& input) {
  return detail::conv_call<D>(options, input, weight, bias);
}

template <size_t D>
ConvTransposeImpl<D>::ConvTransposeImpl(ConvTransposeOptions<D> options_) : options(std::move(options_)) {
  const std::string name = layer_name("ConvTranspose", D);
  check_channels(name, options.in_channels(), options.out_channels(), options.groups());
  check_at_least<D>(name, "kernel_size", options.kernel_size(), 1);
  check_at_least<D>(name, "stride", options.stride(), 1);
  check_at_least<D>(name, "dilation", options.dilation(), 1);
  check_at_least<D>(name, "padding", options.padding(), 0);
  check_at_least<D>(name, "output_padding", options.output_padding(), 0);
  ConvTransposeImpl<D>::reset();
}

template <size_t D>
void ConvTransposeImpl<D>::reset() {
  create_parameters<D>(
      *this, weight, bias, options.in_channels(), options.out_channels() / options.groups(),
      options.kernel_size(), options.bias(), options.out_channels());
}

template <size_t D>
void ConvTransposeImpl<D>::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::ConvTranspose" << D << "d(" << options.in_channels() << ", "
         << options.out_channels() << ", kernel_size=" << options.kernel_size()
         << ", stride=" << options.stride() << ", padding=" << options.padding()
         << ", output_padding=" << options.output_padding() << ", groups=" << options.groups()
         << ", bias=" << std::boolalpha << options.bias() << ", dilation=" << options.dilation()
         << (options.spike_input() ? ", spike_input=true" : "") << ")";
}

template <size_t D>
at::Tensor ConvTransposeImpl<D>::forward(const at::Tensor& input, at::OptionalIntArrayRef output_size) {
  const auto conv_transpose = options.spike_input() ? &ops::spike_conv_transpose : &ops::conv_transpose;
  return conv_transpose(
      input, weight, detail::optional_bias(bias), *options.stride(), *options.padding(),
      *options.output_padding(), options.groups(), *options.dilation(), output_size);
}

template class ConvImpl<1>;
template class ConvImpl<2>;
template class ConvImpl<3>;
template class ConvTransposeImpl<1>;
template class ConvTransposeImpl<2>;
template class ConvTransposeImpl<3>;

}  // namespace matterhorn::snn
