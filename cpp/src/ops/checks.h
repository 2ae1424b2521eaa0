#pragma once
// Argument checks shared by every op, phrased in the user's terms ([T, B, ...], torch dtypes).
#include <ostream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace matterhorn::ops::detail {

// "torch.float32" rather than ATen's "Float".
inline std::string dtype_name(at::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

// What to do about an input of another dtype than the layer's: an integer, bool, complex or
// float8 input is cast (the layers compute in a floating dtype), a floating one may move the layer.
inline std::string dtype_remedy(at::ScalarType input, at::ScalarType layer, const char* what) {
  if (!at::isFloatingType(input) || at::isFloat8Type(input)) {
    return std::string("cast the ") + what + " to " + dtype_name(layer);
  }
  return std::string("cast the ") + what + " or call .to(" + dtype_name(input) + ") on the layer";
}

// A layer's name in messages, e.g. {"Conv", 2} -> "Conv2d". Streamed only when a check fails, so
// that a passing check builds no string (checks run on every call).
struct LayerName {
  const char* family;
  int64_t dims;
};

inline std::ostream& operator<<(std::ostream& out, const LayerName& name) {
  return out << name.family << name.dims << "d";
}

// A parameter of `layer` (a LayerName or a string) must share the input's dtype (TypeError) and
// device (ValueError).
template <typename Name>
void check_same_dtype_and_device(
    const Name& layer, const at::Tensor& input, const at::Tensor& param, const char* param_name) {
  TORCH_CHECK_TYPE(
      input.scalar_type() == param.scalar_type(), layer, ": the input's dtype ",
      dtype_name(input.scalar_type()), " does not match the layer's ", param_name, " dtype ",
      dtype_name(param.scalar_type()), "; ", dtype_remedy(input.scalar_type(), param.scalar_type(), "input"));
  TORCH_CHECK_VALUE(
      input.device() == param.device(), layer, ": the input is on ", input.device(),
      " but the layer's ", param_name, " is on ", param.device(),
      "; move one of them with .to(device)");
}

// A normalization's parameter (or running statistic) of `layer`: the input's dtype, or float32
// beside a float16/bfloat16 input, as torch's normalizations accept (TypeError); the input's
// device (ValueError).
template <typename Name>
void check_norm_parameter_dtype_and_device(
    const Name& layer, const at::Tensor& input, const at::Tensor& param, const char* param_name) {
  const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  if (reduced_input && param.scalar_type() == at::kFloat) {
    TORCH_CHECK_VALUE(
        input.device() == param.device(), layer, ": the input is on ", input.device(), " but the layer's ",
        param_name, " is on ", param.device(), "; move one of them with .to(device)");
    return;
  }
  check_same_dtype_and_device(layer, input, param, param_name);
}

}  // namespace matterhorn::ops::detail
