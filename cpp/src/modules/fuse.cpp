#include "matterhorn/snn/fuse.h"

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ops/rsqrt.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/linear.h>

#include "matterhorn/snn/conv.h"
#include "matterhorn/snn/linear.h"
#include "matterhorn/snn/normalization.h"

namespace matterhorn::snn {
namespace {

// The first value that `find(rank)` gives for rank 1, 2, 3 (an optional), or nullopt.
template <typename Find>
auto first_rank(const Find& find) {
  auto result = find(std::integral_constant<size_t, 1>{});
  if (!result) result = find(std::integral_constant<size_t, 2>{});
  if (!result) result = find(std::integral_constant<size_t, 3>{});
  return result;
}

// `visit(bn, name, D)` on `module` if it is one of our BatchNorms whose eval is x * scale + shift
// per channel (BatchNorm1d/2d/3d, and tdBN, which only initialises differently), else nullopt.
// TEBN (a scale per step) and BNTT (per-step statistics) are not.
template <typename Visit>
auto visit_batch_norm(const torch::nn::Module& module, const Visit& visit) {
  using Result = decltype(visit(std::declval<const BatchNormImpl<1>&>(), std::string(), size_t{1}));
  return first_rank([&](auto rank) -> Result {
    constexpr size_t D = decltype(rank)::value;
    if (const auto* bn = dynamic_cast<const BatchNormImpl<D>*>(&module)) return visit(*bn, c10::str("BatchNorm", D, "d"), D);
    using ThresholdDependent = TemporalBatchNormImpl<TemporalNorm::kThresholdDependent, D>;
    if (const auto* bn = dynamic_cast<const ThresholdDependent*>(&module)) {
      return visit(*bn, c10::str("ThresholdDependentBatchNorm", D, "d"), D);
    }
    return std::nullopt;
  });
}

// Channels and the rank of the layout they sit in: a BatchNorm{D}d normalizes the channels of
// [T, B, C, D spatial sizes]; a Linear's features are those of BatchNorm1d's [T, B, C] (a
// BatchNorm of another rank normalizes another dimension than the layer's outputs).
using Channels = std::pair<int64_t, size_t>;

// The channels of `module` if it is a BatchNorm that visit_batch_norm knows.
std::optional<Channels> batch_norm_channels(const torch::nn::Module& module) {
  return visit_batch_norm(module, [](const auto& bn, const std::string&, size_t rank) {
    return std::optional<Channels>(Channels{bn.options.num_features(), rank});
  });
}

// The output channels of `layer` if it is one of the layers a BatchNorm folds into.
std::optional<Channels> output_channels(const torch::nn::Module& layer) {
  if (const auto* linear = dynamic_cast<const LinearImpl*>(&layer)) return Channels{linear->options.out_features(), 1};
  return first_rank([&](auto rank) -> std::optional<Channels> {
    constexpr size_t D = decltype(rank)::value;
    if (const auto* conv = dynamic_cast<const ConvImpl<D>*>(&layer)) return Channels{conv->options.out_channels(), D};
    if (const auto* conv = dynamic_cast<const ConvTransposeImpl<D>*>(&layer)) {
      return Channels{conv->options.out_channels(), D};
    }
    return std::nullopt;
  });
}

// Eval-mode BatchNorm as x * scale + shift per channel (float64).
struct Affine {
  at::Tensor scale, shift;
};

// `module` (a BatchNorm that visit_batch_norm knows) as its affine map.
Affine batch_norm_affine(const torch::nn::Module& module, const std::string& where) {
  return *visit_batch_norm(module, [&](const auto& bn, const std::string& name, size_t) -> std::optional<Affine> {
    TORCH_CHECK_VALUE(
        bn.running_mean.defined() && bn.running_var.defined(), "matterhorn::snn::fuse: ", where, " (", name,
        ") has track_running_stats=false, so eval normalises with each batch's statistics, which cannot be folded "
        "into a weight; build it with track_running_stats(true) or take it out of the Sequential");
    TORCH_CHECK_VALUE(
        bn.options.eps() >= 0, "matterhorn::snn::fuse: ", where, " (", name, "): eps must be non-negative, got ",
        bn.options.eps());
    at::Tensor scale = at::rsqrt(bn.running_var.to(at::kDouble) + bn.options.eps());
    if (bn.weight.defined()) scale = scale * bn.weight.to(at::kDouble);
    at::Tensor shift = -bn.running_mean.to(at::kDouble) * scale;
    if (bn.bias.defined()) shift = shift + bn.bias.to(at::kDouble);
    return Affine{scale, shift};
  });
}

// A new layer (Layer: LinearImpl, ConvImpl<D>, ConvTransposeImpl<D>) from `layer`'s options with
// a bias, holding the folded weight and bias. `groups` > 0: a transposed convolution's weight
// [C_in, C_out / groups, k...], whose output channel g * C_out / groups + j is [g-th block of
// inputs, j]; 0: the output channels are the weight's leading dimension.
template <typename Layer>
torch::nn::AnyModule folded(const Layer& layer, const Affine& bn, int64_t groups) {
  auto options = layer.options;
  options.bias(true);
  auto result = std::make_shared<Layer>(options);
  const c10::NoGradGuard no_grad;
  const at::Tensor weight = layer.weight.to(at::kDouble);
  at::Tensor scaled;
  if (groups > 0) {
    std::vector<int64_t> shape(weight.dim() + 1, 1);
    shape[0] = groups;
    shape[2] = -1;
    scaled = (weight.unflatten(0, {groups, -1}) * bn.scale.view(shape)).flatten(0, 1);
  } else {
    std::vector<int64_t> shape(weight.dim(), 1);
    shape[0] = -1;
    scaled = weight * bn.scale.view(shape);
  }
  const at::Tensor bias = layer.bias.defined() ? layer.bias.to(at::kDouble) * bn.scale + bn.shift : bn.shift;
  result->to(layer.weight.device(), layer.weight.scalar_type());
  result->weight.copy_(scaled);
  result->bias.copy_(bias);
  result->weight.set_requires_grad(layer.weight.requires_grad());
  result->bias.set_requires_grad(layer.weight.requires_grad());
  result->eval();
  return torch::nn::AnyModule(torch::nn::ModuleHolder<Layer>(result));
}

// `layer` (one that output_channels knows) with `bn` folded in.
torch::nn::AnyModule fold(const torch::nn::Module& layer, const Affine& bn) {
  if (const auto* linear = dynamic_cast<const LinearImpl*>(&layer)) return folded(*linear, bn, 0);
  return *first_rank([&](auto rank) -> std::optional<torch::nn::AnyModule> {
    constexpr size_t D = decltype(rank)::value;
    if (const auto* conv = dynamic_cast<const ConvImpl<D>*>(&layer)) return folded(*conv, bn, 0);
    if (const auto* conv = dynamic_cast<const ConvTransposeImpl<D>*>(&layer)) {
      return folded(*conv, bn, conv->options.groups());
    }
    return std::nullopt;
  });
}

}  // namespace

torch::nn::Sequential fuse(const torch::nn::Sequential& model) {
  for (const auto& item : model->named_modules()) {
    TORCH_CHECK_VALUE(
        !item.value()->is_training(), "matterhorn::snn::fuse: the model is in training mode (",
        item.key().empty() ? std::string("the Sequential") : item.key(),
        "); folding uses the running statistics that training changes: call eval() first");
  }
  torch::nn::Sequential result;
  const std::vector<std::string> names = model->named_children().keys();
  const size_t size = model->size();
  for (size_t i = 0; i < size; ++i) {
    const std::shared_ptr<torch::nn::Module> module = model->ptr(i);
    if (i + 1 < size) {
      const std::shared_ptr<torch::nn::Module> next = model->ptr(i + 1);
      const std::optional<Channels> channels = output_channels(*module);
      // A BatchNorm over other channels than the layer's outputs is not a per-channel affine of them.
      if (channels && batch_norm_channels(*next) == channels) {
        result->push_back(names[i], fold(*module, batch_norm_affine(*next, names[i + 1])));
        result->push_back(names[i + 1], torch::nn::AnyModule(torch::nn::Identity()));
        ++i;
        continue;
      }
    }
    result->push_back(names[i], model->begin()[static_cast<std::ptrdiff_t>(i)].clone());
  }
  result->eval();
  return result;
}

}  // namespace matterhorn::snn
