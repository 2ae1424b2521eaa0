#pragma once
// Argument checks shared by every op, phrased in the user's terms ([T, B, ...], torch dtypes).
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace matterhorn::ops::detail {

// "torch.float32" rather than ATen's "Float".
inline std::string dtype_name(at::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

// A parameter of `layer` must share the input's dtype (TypeError) and device (ValueError).
inline void check_same_dtype_and_device(
    const char* layer, const at::Tensor& input, const at::Tensor& param, const char* param_name) {
  TORCH_CHECK_TYPE(
      input.scalar_type() == param.scalar_type(), layer, ": the input's dtype ",
      dtype_name(input.scalar_type()), " does not match the layer's ", param_name, " dtype ",
      dtype_name(param.scalar_type()), "; cast the input or call .to(",
      dtype_name(input.scalar_type()), ") on the layer");
  TORCH_CHECK_VALUE(
      input.device() == param.device(), layer, ": the input is on ", input.device(),
      " but the layer's ", param_name, " is on ", param.device(),
      "; move one of them with .to(device)");
}

}  // namespace matterhorn::ops::detail
