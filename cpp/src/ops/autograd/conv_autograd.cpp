// Autograd kernels of matterhorn::conv / conv_transpose. Folding and padding are ATen views and
// ops with their own derivatives; the convolution on the folded tensor is a Function whose
// backward is one at::convolution_backward (oneDNN / cuDNN), itself differentiable, so double
// backward works.
#include <ATen/ops/convolution_backward.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/conv.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ConvolutionFunction : public torch::autograd::Function<ConvolutionFunction> {
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
      c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed,
      c10::SymIntArrayRef output_padding, c10::SymInt groups) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["output_padding"] = output_padding;
    ctx->saved_data["groups"] = groups;
    // An absent bias is not an autograd input: needs_input_grad(2) exists only with a bias.
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    return matterhorn::ops::detail::aten_convolution(
        input, weight, bias, stride, padding, dilation, transposed, output_padding, std::move(groups));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const bool transposed = ctx->saved_data["transposed"].toBool();
    const c10::SymInt groups = ctx->saved_data["groups"].toSymInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const c10::SymInt out_channels = transposed ? weight.sym_size(1) * groups : weight.sym_size(0);
    const std::vector<c10::SymInt> bias_sizes{out_channels};
    const std::array<bool, 3> mask{
        ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)};
    auto [grad_input, grad_weight, grad_bias] = at::convolution_backward_symint(
        grad_outputs[0], input, weight,
        has_bias ? at::OptionalSymIntArrayRef(bias_sizes) : at::OptionalSymIntArrayRef(),
        ctx->saved_data["stride"].toSymIntVector(), ctx->saved_data["padding"].toSymIntVector(),
        ctx->saved_data["dilation"].toSymIntVector(), transposed,
        ctx->saved_data["output_padding"].toSymIntVector(), groups, mask);
    // One entry per forward argument; the non-tensor ones get none.
    return {grad_input, grad_weight, grad_bias, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor autograd_convolution(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
    bool transposed, c10::SymIntArrayRef output_padding, c10::SymInt groups) {
  return ConvolutionFunction::apply(
      input, weight, bias, stride, padding, dilation, transposed, output_padding, std::move(groups));
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  using namespace matterhorn::ops::detail;
  m.impl("conv", &conv_kernel<&autograd_convolution>);
  m.impl("conv_transpose", &conv_transpose_kernel<&autograd_convolution>);
}
