#include "matterhorn/snn/weight_standardization.h"

#include <cctype>
#include <utility>

#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "matterhorn/ops/conv.h"
#include "matterhorn/ops/linear.h"
#include "matterhorn/ops/spike.h"
#include "matterhorn/ops/weight_standardize.h"

namespace matterhorn::snn {
namespace {

// Runs `call`: the twin module's constructor (Linear, ConvNd: it checks the arguments and
// initialises weight and bias as torch.nn does) or the twin's op in forward. Their errors name the
// twin ("Conv2d: ..."); they are raised again in this layer's name ("WSConv2d: ...").
template <typename Call>
auto in_layer_name(Call&& call) {
  try {
    return call();
  } catch (const c10::ValueError& error) {
    C10_THROW_ERROR(ValueError, "WS" + error.msg());
  } catch (const c10::TypeError& error) {
    C10_THROW_ERROR(TypeError, "WS" + error.msg());
  }
}

// Takes the twin's weight and bias, checks what standardisation needs, adds gamma and beta.
template <typename Twin>
void create_parameters(
    torch::nn::Module& module, const std::string& layer, const Twin& twin, bool with_bias, bool affine, double eps,
    at::Tensor& weight, at::Tensor& bias, at::Tensor& gamma, at::Tensor& beta) {
  weight = module.register_parameter("weight", twin.weight);
  bias = with_bias ? module.register_parameter("bias", twin.bias) : module.register_parameter("bias", {}, false);
  int64_t fan_in = 1;
  for (int64_t d = 1; d < weight.dim(); ++d) fan_in *= weight.size(d);
  TORCH_CHECK_VALUE(
      fan_in != 1, layer, ": weight standardisation needs 2 or more weights per output channel (an unbiased "
      "variance); this layer's weight ", weight.sizes(), " has 1");
  TORCH_CHECK_VALUE(eps >= 0, layer, ": eps must be >= 0, got ", eps);
  const int64_t out = weight.size(0);
  gamma = module.register_parameter("gamma", at::ones({out}), /*requires_grad=*/affine);
  beta = module.register_parameter("beta", at::zeros({out}), /*requires_grad=*/false);
}

std::optional<at::Tensor> optional_bias(const at::Tensor& bias) {
  return bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
}

}  // namespace

WSLinearImpl::WSLinearImpl(WSLinearOptions options_) : options(std::move(options_)) { WSLinearImpl::reset(); }

void WSLinearImpl::reset() {
  const auto twin = in_layer_name([&] { return LinearImpl(options.linear()); });
  create_parameters(*this, "WSLinear", twin, options.bias(), options.affine(), options.eps(), weight, bias, gamma,
                    beta);
}

void WSLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::WSLinear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha << options.bias()
         << ", affine=" << options.affine() << ", eps=" << options.eps()
         << (options.spike_input() ? ", spike_input=true" : "") << ")";
}

at::Tensor WSLinearImpl::standardized_weight() const {
  return ops::weight_standardize(weight, gamma, beta, options.eps());
}

at::Tensor WSLinearImpl::forward(const at::Tensor& input) {
  const auto linear = options.spike_input() ? &ops::spike_linear : &ops::linear;
  const at::Tensor w = standardized_weight();
  return in_layer_name([&] { return linear(input, w, optional_bias(bias)); });
}

template <size_t D>
WSConvImpl<D>::WSConvImpl(WSConvOptions<D> options_) : options(std::move(options_)) {
  WSConvImpl<D>::reset();
}

template <size_t D>
void WSConvImpl<D>::reset() {
  const auto twin = in_layer_name([&] { return ConvImpl<D>(options.conv()); });
  create_parameters(*this, c10::str("WSConv", D, "d"), twin, options.bias(), options.affine(), options.eps(), weight,
                    bias, gamma, beta);
  // the op's explicit padding, and its name for the padding mode ("zeros" from torch::kZeros)
  if (const auto* sizes = std::get_if<torch::ExpandingArray<D>>(&options.padding())) {
    padding_.assign((*sizes)->begin(), (*sizes)->end());
  } else if (std::holds_alternative<torch::enumtype::kSame>(options.padding())) {
    padding_ = ops::same_padding(*options.kernel_size(), *options.dilation());
  } else {
    padding_.assign(D, 0);  // 'valid'
  }
  padding_mode_ = torch::enumtype::get_enum_name(options.padding_mode());
  padding_mode_.erase(0, 1);
  padding_mode_[0] = static_cast<char>(std::tolower(padding_mode_[0]));
}

template <size_t D>
void WSConvImpl<D>::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::WSConv" << D << "d(" << options.in_channels() << ", " << options.out_channels()
         << ", kernel_size=" << options.kernel_size() << ", stride=" << options.stride() << ", padding=";
  if (const auto* sizes = std::get_if<torch::ExpandingArray<D>>(&options.padding())) {
    stream << *sizes;
  } else {
    stream << (std::holds_alternative<torch::enumtype::kSame>(options.padding()) ? "same" : "valid");
  }
  stream << ", dilation=" << options.dilation() << ", groups=" << options.groups() << ", bias=" << std::boolalpha
         << options.bias() << ", padding_mode=" << padding_mode_ << ", affine=" << options.affine()
         << ", eps=" << options.eps() << (options.spike_input() ? ", spike_input=true" : "") << ")";
}

template <size_t D>
at::Tensor WSConvImpl<D>::standardized_weight() const {
  return ops::weight_standardize(weight, gamma, beta, options.eps());
}

template <size_t D>
at::Tensor WSConvImpl<D>::forward(const at::Tensor& input) {
  const auto conv = options.spike_input() ? &ops::spike_conv : &ops::conv;
  const at::Tensor w = standardized_weight();
  return in_layer_name([&] {
    return conv(input, w, optional_bias(bias), *options.stride(), padding_, *options.dilation(), options.groups(),
                padding_mode_);
  });
}

template class WSConvImpl<1>;
template class WSConvImpl<2>;
template class WSConvImpl<3>;

}  // namespace matterhorn::snn
