#pragma once
// What the synapse modules and their weight-standardised twins share: the bias as the ops take it,
// the folded op (dense or spike_input) called with the options' arguments, the padding mode's name,
// and the convolution arguments' part of the module's repr.
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <variant>
#include <vector>

#include <ATen/core/Tensor.h>

#include "matterhorn/ops/conv.h"
#include "matterhorn/ops/linear.h"
#include "matterhorn/ops/spike.h"
#include "matterhorn/snn/conv.h"
#include "matterhorn/snn/linear.h"

namespace matterhorn::snn::detail {

inline std::optional<at::Tensor> optional_bias(const at::Tensor& bias) {
  return bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
}

// ops::linear (ops::spike_linear with spike_input) of input with weight and bias (undefined: none).
inline at::Tensor linear_call(const LinearOptions& options, const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& bias) {
  const auto linear = options.spike_input() ? &ops::spike_linear : &ops::linear;
  return linear(input, weight, optional_bias(bias));
}

// "zeros" from torch::kZeros, as the op's padding_mode argument spells it.
inline std::string padding_mode_name(const torch::nn::detail::conv_padding_mode_t& mode) {
  std::string name = torch::enumtype::get_enum_name(mode);  // "kZeros"
  name.erase(0, 1);
  name[0] = static_cast<char>(std::tolower(name[0]));
  return name;
}

// ops::conv (ops::spike_conv with spike_input) of input with weight and bias (undefined: none).
template <size_t D>
at::Tensor conv_call(const ConvOptions<D>& options, const at::Tensor& input, const at::Tensor& weight,
                     const at::Tensor& bias) {
  std::vector<int64_t> padding;
  if (const auto* sizes = std::get_if<torch::ExpandingArray<D>>(&options.padding())) {
    padding.assign((*sizes)->begin(), (*sizes)->end());
  } else if (std::holds_alternative<torch::enumtype::kSame>(options.padding())) {
    padding = ops::same_padding(*options.kernel_size(), *options.dilation());
  } else {
    padding.assign(D, 0);  // 'valid'
  }
  const auto conv = options.spike_input() ? &ops::spike_conv : &ops::conv;
  return conv(input, weight, optional_bias(bias), *options.stride(), padding, *options.dilation(), options.groups(),
              padding_mode_name(options.padding_mode()));
}

// "in, out, kernel_size=..., stride=..., padding=..., dilation=..., groups=..., bias=..., padding_mode=..."
template <size_t D>
void print_conv_arguments(std::ostream& stream, const ConvOptions<D>& options) {
  stream << options.in_channels() << ", " << options.out_channels() << ", kernel_size=" << options.kernel_size()
         << ", stride=" << options.stride() << ", padding=";
  if (const auto* sizes = std::get_if<torch::ExpandingArray<D>>(&options.padding())) {
    stream << *sizes;
  } else {
    stream << (std::holds_alternative<torch::enumtype::kSame>(options.padding()) ? "same" : "valid");
  }
  stream << ", dilation=" << options.dilation() << ", groups=" << options.groups() << ", bias=" << std::boolalpha
         << options.bias() << ", padding_mode=" << padding_mode_name(options.padding_mode());
}

}  // namespace matterhorn::snn::detail
