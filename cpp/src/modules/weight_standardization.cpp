#include "matterhorn/snn/weight_standardization.h"

#include <utility>

#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "matterhorn/ops/weight_standardize.h"
#include "modules/synapse_call.h"

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
  const at::Tensor w = standardized_weight();
  return in_layer_name([&] { return detail::linear_call(options.linear(), input, w, bias); });
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
}

template <size_t D>
void WSConvImpl<D>::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::WSConv" << D << "d(";
  detail::print_conv_arguments<D>(stream, options.conv());
  stream << ", affine=" << options.affine() << ", eps=" << options.eps()
         << (options.spike_input() ? ", spike_input=true" : "") << ")";
}

template <size_t D>
at::Tensor WSConvImpl<D>::standardized_weight() const {
  return ops::weight_standardize(weight, gamma, beta, options.eps());
}

template <size_t D>
at::Tensor WSConvImpl<D>::forward(const at::Tensor& input) {
  const at::Tensor w = standardized_weight();
  return in_layer_name([&] { return detail::conv_call<D>(options.conv(), input, w, bias); });
}

template class WSConvImpl<1>;
template class WSConvImpl<2>;
template class WSConvImpl<3>;

}  // namespace matterhorn::snn
