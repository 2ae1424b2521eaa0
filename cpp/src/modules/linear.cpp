#include "matterhorn/snn/linear.h"

#include <ATen/ops/empty.h>

#include "modules/init.h"
#include "modules/synapse_call.h"

namespace matterhorn::snn {

LinearImpl::LinearImpl(LinearOptions options_) : options(std::move(options_)) {
  TORCH_CHECK_VALUE(
      options.in_features() >= 0 && options.out_features() >= 0,
      "Linear: in_features and out_features must be non-negative, got ", options.in_features(),
      " and ", options.out_features());
  LinearImpl::reset();
}

void LinearImpl::reset() {
  weight = register_parameter(
      "weight", at::empty({options.out_features(), options.in_features()}));
  bias = options.bias() ? register_parameter("bias", at::empty({options.out_features()}))
                        : register_parameter("bias", {}, /*requires_grad=*/false);
  reset_parameters();
}

void LinearImpl::reset_parameters() {
  detail::init_like_torch_nn(weight, bias);
}

void LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::Linear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha
         << options.bias() << (options.spike_input() ? ", spike_input=true" : "") << ")";
}

at::Tensor LinearImpl::forward(const at::Tensor& input) {
  return detail::linear_call(options, input, weight, bias);
}

}  // namespace matterhorn::snn
