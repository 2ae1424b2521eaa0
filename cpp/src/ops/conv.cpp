// matterhorn::conv and matterhorn::conv_transpose: schemas, argument checks, folding and padding,
// and the C++ functional entries.
#include "ops/conv.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/pad.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "matterhorn/ops/conv.h"
#include "ops/checks.h"

namespace matterhorn::ops {
namespace detail {
namespace {

// The page's names for the spatial sizes: [L], [H, W], [H, W, L].
const char* spatial_names(int64_t dims) {
  switch (dims) {
    case 1: return "L";
    case 2: return "H, W";
    default: return "H, W, L";
  }
}

int64_t spatial_dims(const at::Tensor& weight) { return weight.dim() - 2; }

c10::SymInt padding_before(const ConvSpec& spec, int64_t d, int64_t dims) {
  return spec.padding.size() == static_cast<size_t>(dims) ? spec.padding[d] : spec.padding[2 * d];
}
c10::SymInt padding_after(const ConvSpec& spec, int64_t d, int64_t dims) {
  return spec.padding.size() == static_cast<size_t>(dims) ? spec.padding[d] : spec.padding[2 * d + 1];
}

// The user's input shape written out, e.g. "[T, B, C, H, W] = [4, 8, 3, 32, 32]".
std::string user_shape(const at::Tensor& input, int64_t dims) {
  const char* leading = input.dim() == dims + 3 ? "[T, B, C, " : input.dim() == dims + 2 ? "[B, C, " : "[C, ";
  return c10::str(leading, spatial_names(dims), "] = ", input.sym_sizes());
}

void check_sizes_argument(
    const LayerName& name, const char* what, c10::SymIntArrayRef values, int64_t dims,
    int64_t minimum) {
  TORCH_CHECK_VALUE(
      values.size() == static_cast<size_t>(dims), name, ": ", what, " must have ", dims,
      " value(s), one per spatial dimension; got ", values);
  for (const auto& value : values) {
    TORCH_CHECK_VALUE(value >= minimum, name, ": ", what, " must be >= ", minimum, ", got ", values);
  }
}

}  // namespace

LayerName conv_layer_name(const at::Tensor& weight, bool transposed) {
  return {transposed ? "ConvTranspose" : "Conv", spatial_dims(weight)};
}

void check_conv_arguments(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const ConvSpec& spec) {
  TORCH_CHECK_VALUE(
      weight.dim() >= 3 && weight.dim() <= 5,
      "conv: weight must have 1 to 3 spatial dimensions ([C_out, C_in / groups, k...]), got ",
      weight.sym_sizes());
  const int64_t dims = spatial_dims(weight);
  const LayerName name = conv_layer_name(weight, spec.transposed);
  const char* spatial = spatial_names(dims);

  TORCH_CHECK_VALUE(spec.groups >= 1, name, ": groups must be positive, got ", spec.groups);
  check_sizes_argument(name, "stride", spec.stride, dims, 1);
  check_sizes_argument(name, "dilation", spec.dilation, dims, 1);
  const bool paired_padding = spec.padding.size() == static_cast<size_t>(2 * dims);
  TORCH_CHECK_VALUE(
      spec.padding.size() == static_cast<size_t>(dims) || (paired_padding && !spec.transposed), name,
      ": padding must have ", dims, spec.transposed ? "" : c10::str(" or ", 2 * dims, " (before, after)"),
      " value(s); got ", spec.padding);
  for (const auto& value : spec.padding) {
    TORCH_CHECK_VALUE(value >= 0, name, ": padding must be >= 0, got ", spec.padding);
  }
  if (spec.transposed) {
    check_sizes_argument(name, "output_padding", spec.output_padding, dims, 0);
    for (const auto d : c10::irange(dims)) {  // torch.nn's rule
      TORCH_CHECK_VALUE(
          spec.output_padding[d] < spec.stride[d] || spec.output_padding[d] < spec.dilation[d], name,
          ": output_padding must be smaller than stride or dilation in each spatial dimension; got output_padding ",
          spec.output_padding, ", stride ", spec.stride, ", dilation ", spec.dilation);
    }
  }
  TORCH_CHECK_VALUE(
      spec.padding_mode == "zeros" || (!spec.transposed && (spec.padding_mode == "reflect" ||
                                                             spec.padding_mode == "replicate" ||
                                                             spec.padding_mode == "circular")),
      name, ": padding_mode must be ",
      spec.transposed ? "'zeros'" : "one of 'zeros', 'reflect', 'replicate', 'circular'", "; got '",
      spec.padding_mode, "'");

  TORCH_CHECK_VALUE(
      weight.sym_size(0) % spec.groups == 0, name, ": the weight's first dimension (",
      spec.transposed ? "in_channels" : "out_channels", " = ", weight.sym_size(0), ") must be divisible by groups (",
      spec.groups, ")");
  const c10::SymInt in_channels =
      spec.transposed ? weight.sym_size(0) : weight.sym_size(1) * spec.groups;
  const c10::SymInt out_channels =
      spec.transposed ? weight.sym_size(1) * spec.groups : weight.sym_size(0);
  TORCH_CHECK_VALUE(
      input.dim() >= dims + 1 && input.dim() <= dims + 3, name, ": expected input [T, B, C, ",
      spatial, "] in multi-step mode or [B, C, ", spatial, "] (unbatched: [C, ", spatial,
      "]) in single-step mode; got a ", input.dim(), "-D tensor ", input.sym_sizes());
  TORCH_CHECK_VALUE(
      input.sym_size(-dims - 1) == in_channels, name, "(in_channels=", in_channels,
      "): expected input [T, B, ", in_channels, ", ", spatial, "] in multi-step mode or [B, ",
      in_channels, ", ", spatial, "] in single-step mode; got ", input.sym_sizes());
  check_same_dtype_and_device(name, input, weight, "weight");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(
        bias->dim() == 1 && bias->sym_size(0) == out_channels, name, ": bias must be [out_channels] = [",
        out_channels, "], got ", bias->sym_sizes());
    check_same_dtype_and_device(name, input, *bias, "bias");
  }

  // Spatial sizes: the kernel must fit the (padded) input; a transposed conv must produce output.
  c10::SymInt batch = 1;  // T*B or B
  for (const auto d : c10::irange(input.dim() - dims - 1)) batch = batch * input.sym_size(d);
  for (const auto d : c10::irange(dims)) {
    const c10::SymInt size = input.sym_size(input.dim() - dims + d);
    // as torch.nn: a spatial size of 0 only beside an empty batch (or no channels), and padded by zeros
    TORCH_CHECK_VALUE(
        size != 0 || (spec.padding_mode == "zeros" && (batch == 0 || in_channels == 0)), name,
        ": spatial size 0 in dimension ", d, " is accepted only with T, B or C of 0",
        spec.padding_mode == "zeros" ? "" : " and padding_mode='zeros'", "; got input ", user_shape(input, dims));
    const c10::SymInt before = padding_before(spec, d, dims);
    const c10::SymInt after = padding_after(spec, d, dims);
    const c10::SymInt kernel_extent = spec.dilation[d] * (weight.sym_size(2 + d) - 1) + 1;
    if (spec.transposed) {
      // output_size picks output_padding (fold_and_pad checks its range; a size of 0 is empty, as torch.nn)
      if (spec.output_size.has_value()) continue;
      const c10::SymInt output = (size - 1) * spec.stride[d] - 2 * before + kernel_extent +
          spec.output_padding[d];
      TORCH_CHECK_VALUE(
          output > 0, name, ": the output would be empty (size ", output, " in spatial dimension ",
          d, "); got input ", user_shape(input, dims));
      continue;
    }
    TORCH_CHECK_VALUE(
        size + before + after >= kernel_extent, name, ": the input is too small for the kernel: spatial size ",
        size, " padded by (", before, ", ", after, ") is smaller than the dilated kernel size ",
        kernel_extent, " in spatial dimension ", d, "; got input ", user_shape(input, dims));
    if (spec.padding_mode == "reflect") {
      TORCH_CHECK_VALUE(
          before < size && after < size, name, ": padding_mode='reflect' needs padding smaller than the input size; got padding (",
          before, ", ", after, ") for size ", size, " in spatial dimension ", d, " of input ",
          user_shape(input, dims));
    } else if (spec.padding_mode == "circular") {
      TORCH_CHECK_VALUE(
          before <= size && after <= size, name, ": padding_mode='circular' needs padding at most the input size; got padding (",
          before, ", ", after, ") for size ", size, " in spatial dimension ", d, " of input ",
          user_shape(input, dims));
    }
  }
}

FoldedConv fold_and_pad(const at::Tensor& input, const at::Tensor& weight, const ConvSpec& spec) {
  const int64_t dims = spatial_dims(weight);
  FoldedConv folded;
  folded.input = input;
  if (input.dim() == dims + 3) {  // multi-step: [T, B, C, ...] -> [T*B, C, ...], a view
    folded.time_batch = c10::SymDimVector{input.sym_size(0), input.sym_size(1)};
    folded.input = input.flatten(0, 1);
  } else if (input.dim() == dims + 1) {  // unbatched [C, ...], as torch.nn accepts: a batch of one
    folded.unbatched = true;
    folded.input = input.unsqueeze(0);
  }

  bool symmetric = true;
  for (const auto d : c10::irange(dims)) {
    symmetric = symmetric && padding_before(spec, d, dims) == padding_after(spec, d, dims);
  }
  if (spec.padding_mode == "zeros" && symmetric) {
    for (const auto d : c10::irange(dims)) folded.padding.push_back(padding_before(spec, d, dims));
  } else {
    // A padding mode or an asymmetric 'same': pad explicitly as torch.nn does (last dim first).
    c10::SymDimVector pad(2 * dims);
    for (const auto d : c10::irange(dims)) {
      pad[2 * (dims - 1 - d)] = padding_before(spec, d, dims);
      pad[2 * (dims - 1 - d) + 1] = padding_after(spec, d, dims);
    }
    folded.input = at::pad_symint(
        folded.input, pad, spec.padding_mode == "zeros" ? "constant" : spec.padding_mode);
    folded.padding.assign(dims, 0);
  }

  if (!spec.transposed) {
    folded.output_padding.assign(dims, 0);
  } else if (!spec.output_size.has_value()) {
    folded.output_padding.assign(spec.output_padding.begin(), spec.output_padding.end());
  } else {
    // output_size picks output_padding, as torch.nn.ConvTransposeNd.forward does. The full
    // output shape ([T, B, C, ...] or [B, C, ...]) is accepted as well as the spatial sizes.
    const LayerName name = conv_layer_name(weight, true);
    c10::SymIntArrayRef requested = *spec.output_size;
    if (requested.size() > static_cast<size_t>(dims) && requested.size() <= static_cast<size_t>(dims + 3)) {
      requested = requested.slice(requested.size() - dims);
    }
    TORCH_CHECK_VALUE(
        requested.size() == static_cast<size_t>(dims), name, ": output_size must have ", dims,
        " spatial size(s) (or be the whole output shape); got ", *spec.output_size);
    c10::SymDimVector smallest, largest;
    for (const auto d : c10::irange(dims)) {
      smallest.push_back(
          (folded.input.sym_size(2 + d) - 1) * spec.stride[d] - 2 * spec.padding[d] +
          spec.dilation[d] * (weight.sym_size(2 + d) - 1) + 1);
      largest.push_back(smallest.back() + spec.stride[d] - 1);
    }
    for (const auto d : c10::irange(dims)) {
      TORCH_CHECK_VALUE(
          smallest[d] <= requested[d] && requested[d] <= largest[d], name,
          ": requested an output size of ", requested, ", but valid sizes range from ",
          c10::SymIntArrayRef(smallest), " to ", c10::SymIntArrayRef(largest), " for input ",
          user_shape(input, dims));
      folded.output_padding.push_back(requested[d] - smallest[d]);
    }
  }
  return folded;
}

at::Tensor unfold_output(const at::Tensor& output, const FoldedConv& folded) {
  if (folded.unbatched) return output.squeeze(0);
  return folded.time_batch.has_value() ? output.unflatten_symint(0, *folded.time_batch) : output;
}

ConvSpec make_conv_spec(
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, c10::SymInt groups,
    std::string_view padding_mode) {
  return {.stride = stride, .padding = padding, .dilation = dilation, .groups = std::move(groups),
          .padding_mode = padding_mode};
}

ConvSpec make_conv_transpose_spec(
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef output_padding, c10::SymInt groups,
    c10::SymIntArrayRef dilation, at::OptionalSymIntArrayRef output_size) {
  return {.transposed = true, .stride = stride, .padding = padding, .dilation = dilation,
          .output_padding = output_padding, .output_size = output_size, .groups = std::move(groups)};
}

namespace {

at::Tensor run_conv(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const ConvSpec& spec) {
  check_conv_arguments(input, weight, bias, spec);
  const FoldedConv folded = fold_and_pad(input, weight, spec);
  return unfold_output(
      at::convolution_symint(folded.input, weight, bias, spec.stride, folded.padding, spec.dilation,
                             spec.transposed, folded.output_padding, spec.groups),
      folded);
}

}  // namespace

at::Tensor conv_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
    c10::SymInt groups, c10::string_view padding_mode) {
  return run_conv(input, weight, bias, make_conv_spec(stride, padding, dilation, std::move(groups), padding_mode));
}

at::Tensor conv_transpose_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef output_padding,
    c10::SymInt groups, c10::SymIntArrayRef dilation, at::OptionalSymIntArrayRef output_size) {
  return run_conv(
      input, weight, bias,
      make_conv_transpose_spec(stride, padding, output_padding, std::move(groups), dilation, output_size));
}

}  // namespace detail

at::Tensor conv(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::string_view padding_mode) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::conv", "")
          .typed<at::Tensor(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt,
              c10::string_view)>();
  return op.call(
      input, weight, bias, c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding),
      c10::fromIntArrayRefSlow(dilation), groups, padding_mode);
}

at::Tensor conv_transpose(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, at::OptionalIntArrayRef output_size) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::conv_transpose", "")
          .typed<at::Tensor(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt,
              c10::SymIntArrayRef, at::OptionalSymIntArrayRef)>();
  at::OptionalSymIntArrayRef sym_output_size;
  if (output_size.has_value()) sym_output_size = c10::fromIntArrayRefSlow(*output_size);
  return op.call(
      input, weight, bias, c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding),
      c10::fromIntArrayRefSlow(output_padding), groups, c10::fromIntArrayRefSlow(dilation),
      sym_output_size);
}

std::vector<int64_t> same_padding(at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(
      kernel_size.size() == dilation.size(), "same_padding: kernel_size ", kernel_size,
      " and dilation ", dilation, " must have the same length");
  std::vector<int64_t> padding;
  for (const auto d : c10::irange(kernel_size.size())) {
    // The total is split evenly; an odd total puts the extra element after, as torch does.
    const int64_t total = dilation[d] * (kernel_size[d] - 1);
    padding.push_back(total / 2);
    padding.push_back(total - total / 2);
  }
  return padding;
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def(
      "conv(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
      "SymInt[] dilation, SymInt groups, str padding_mode=\"zeros\") -> Tensor");
  m.def(
      "conv_transpose(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, "
      "SymInt[] padding, SymInt[] output_padding, SymInt groups, SymInt[] dilation, "
      "SymInt[]? output_size=None) -> Tensor");
}

// One kernel for every backend (CompositeExplicitAutograd: CPU, CUDA, Meta) and for Autograd. It
// is made of ATen views and at::convolution, which carry their own derivatives and device guards:
// called above autograd it records torch's own graph (ConvolutionBackward0: cuDNN / oneDNN
// backward, double backward, forward AD), the graph of torch.nn on the folded tensor, while the
// op stays one node for torch.compile and torch.export; no custom autograd::Function adds its
// context and output wrapping to every call.
TORCH_LIBRARY_IMPL(matterhorn, CompositeExplicitAutograd, m) {
  m.impl("conv", &matterhorn::ops::detail::conv_kernel);
  m.impl("conv_transpose", &matterhorn::ops::detail::conv_transpose_kernel);
}

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("conv", &matterhorn::ops::detail::conv_kernel);
  m.impl("conv_transpose", &matterhorn::ops::detail::conv_transpose_kernel);
}
