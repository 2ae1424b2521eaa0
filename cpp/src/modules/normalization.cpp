#include "matterhorn/snn/normalization.h"

#include <string>
#include <vector>

#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "matterhorn/ops/batch_norm.h"
#include "matterhorn/ops/layer_norm.h"

namespace matterhorn::snn {
namespace {

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace

template <size_t D>
BatchNormImpl<D>::BatchNormImpl(BatchNormOptions options_) : options(std::move(options_)) {
  TORCH_CHECK_VALUE(
      options.num_features() >= 1, "BatchNorm", D, "d: num_features must be >= 1, got ", options.num_features());
  BatchNormImpl<D>::reset();
}

template <size_t D>
void BatchNormImpl<D>::reset() {
  const int64_t C = options.num_features();
  weight = options.affine() ? this->register_parameter("weight", at::ones({C}))
                            : this->register_parameter("weight", {}, /*requires_grad=*/false);
  bias = options.affine() && options.bias() ? this->register_parameter("bias", at::zeros({C}))
                                            : this->register_parameter("bias", {}, /*requires_grad=*/false);
  if (options.track_running_stats()) {
    running_mean = this->register_buffer("running_mean", at::zeros({C}));
    running_var = this->register_buffer("running_var", at::ones({C}));
    num_batches_tracked = this->register_buffer("num_batches_tracked", at::zeros({}, at::kLong));
  }
}

template <size_t D>
void BatchNormImpl<D>::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::BatchNorm" << D << "d(" << options.num_features() << ", eps=" << options.eps()
         << ", momentum=";
  if (options.momentum().has_value()) {
    stream << *options.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << std::boolalpha << options.affine() << ", track_running_stats="
         << options.track_running_stats() << ", step_mode=" << options.step_mode();
  if (options.per_step()) stream << ", per_step=true";
  if (options.batch_first()) stream << ", batch_first=true";
  stream << ")";
}

template <size_t D>
at::Tensor BatchNormImpl<D>::forward(const at::Tensor& input) {
  const bool training = this->is_training();
  const bool use_running = !training || options.track_running_stats();
  static const std::string name = "BatchNorm" + std::to_string(D) + "d";
  return ops::batch_norm_layer(
      input, optional(weight), optional(bias), use_running ? optional(running_mean) : std::nullopt,
      use_running ? optional(running_var) : std::nullopt,
      training && options.track_running_stats() ? optional(num_batches_tracked) : std::nullopt, training,
      options.momentum(), options.eps(), name, options.num_features(), options.step_mode() == StepMode::kMulti,
      options.per_step(), options.batch_first());
}

template class BatchNormImpl<1>;
template class BatchNormImpl<2>;
template class BatchNormImpl<3>;

namespace {

template <TemporalNorm K, size_t D>
const std::string& temporal_name() {
  static const std::string name = std::string(K == TemporalNorm::kThresholdDependent  ? "ThresholdDependentBatchNorm"
                                              : K == TemporalNorm::kTemporalEffective ? "TemporalEffectiveBatchNorm"
                                                                                      : "BatchNormThroughTime") +
                                  std::to_string(D) + "d";
  return name;
}

}  // namespace

template <TemporalNorm K, size_t D>
TemporalBatchNormImpl<K, D>::TemporalBatchNormImpl(TemporalBatchNormOptions options_) : options(std::move(options_)) {
  const std::string& name = temporal_name<K, D>();
  TORCH_CHECK_VALUE(options.num_features() >= 1, name, ": num_features must be >= 1, got ", options.num_features());
  TORCH_CHECK_VALUE(
      K == TemporalNorm::kThresholdDependent || options.T() >= 1, name, ": T (time steps) must be an integer >= 1, got ",
      options.T());
  TemporalBatchNormImpl<K, D>::reset();
}

template <TemporalNorm K, size_t D>
void TemporalBatchNormImpl<K, D>::reset() {
  const int64_t C = options.num_features(), T = options.T();
  const bool through_time = K == TemporalNorm::kThroughTime;
  const std::vector<int64_t> rows = through_time ? std::vector<int64_t>{T, C} : std::vector<int64_t>{C};
  const double initial = K == TemporalNorm::kThresholdDependent ? options.alpha() * options.v_th() : 1.0;
  weight = options.affine() ? this->register_parameter("weight", at::full(rows, initial))
                            : this->register_parameter("weight", {}, /*requires_grad=*/false);
  bias = options.affine() && !through_time ? this->register_parameter("bias", at::zeros({C}))
                                           : this->register_parameter("bias", {}, /*requires_grad=*/false);
  if (K == TemporalNorm::kTemporalEffective) scale = this->register_parameter("scale", at::ones({T}));
  if (options.track_running_stats()) {
    running_mean = this->register_buffer("running_mean", at::zeros(rows));
    running_var = this->register_buffer("running_var", at::ones(rows));
    num_batches_tracked = this->register_buffer("num_batches_tracked", at::zeros({}, at::kLong));
  }
}

template <TemporalNorm K, size_t D>
void TemporalBatchNormImpl<K, D>::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::" << temporal_name<K, D>() << "(";
  if (K == TemporalNorm::kThresholdDependent) {
    stream << "alpha=" << options.alpha() << ", v_th=" << options.v_th() << ", ";
  } else {
    stream << "T=" << options.T() << ", ";
  }
  stream << options.num_features() << ", eps=" << options.eps() << ", momentum=";
  if (options.momentum().has_value()) {
    stream << *options.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << std::boolalpha << options.affine() << ", track_running_stats="
         << options.track_running_stats();
  if (options.batch_first()) stream << ", batch_first=true";
  stream << ")";
}

template <TemporalNorm K, size_t D>
at::Tensor TemporalBatchNormImpl<K, D>::forward(const at::Tensor& input) {
  const bool training = this->is_training();
  const bool use_running = !training || options.track_running_stats();
  at::Tensor output = ops::batch_norm_layer(  // the op checks the rank first
      input, optional(weight), optional(bias), use_running ? optional(running_mean) : std::nullopt,
      use_running ? optional(running_var) : std::nullopt,
      training && options.track_running_stats() ? optional(num_batches_tracked) : std::nullopt, training,
      options.momentum(), options.eps(), temporal_name<K, D>(), options.num_features(), /*multi_step_mode=*/true,
      /*per_step=*/K == TemporalNorm::kThroughTime, options.batch_first(), optional(scale));
  // BNTT without weight and running statistics: no per-step tensor shows the op the layer's T
  const auto steps = input.sym_size(options.batch_first() ? 1 : 0);
  TORCH_CHECK_VALUE(
      K != TemporalNorm::kThroughTime || weight.defined() || running_mean.defined() || steps == options.T(),
      temporal_name<K, D>(), ": expected T = ", options.T(), " time steps (the layer's T), got ", steps, " in input ",
      input.sym_sizes(), options.batch_first() ? " (batch_first: [B, T, ...])" : "");
  return output;
}

#define MATTERHORN_TEMPORAL_NORM(kind)                         \
  template class TemporalBatchNormImpl<TemporalNorm::kind, 1>; \
  template class TemporalBatchNormImpl<TemporalNorm::kind, 2>; \
  template class TemporalBatchNormImpl<TemporalNorm::kind, 3>;
MATTERHORN_TEMPORAL_NORM(kThresholdDependent)
MATTERHORN_TEMPORAL_NORM(kTemporalEffective)
MATTERHORN_TEMPORAL_NORM(kThroughTime)
#undef MATTERHORN_TEMPORAL_NORM

LayerNormImpl::LayerNormImpl(LayerNormOptions options_) : options(std::move(options_)) {
  TORCH_CHECK_VALUE(!options.normalized_shape().empty(), "LayerNorm: normalized_shape must hold at least one size, got []");
  for (const int64_t size : options.normalized_shape()) {
    TORCH_CHECK_VALUE(size >= 1, "LayerNorm: normalized_shape must hold sizes >= 1, got ", options.normalized_shape());
  }
  LayerNormImpl::reset();
}

void LayerNormImpl::reset() {
  const auto& shape = options.normalized_shape();
  weight = options.elementwise_affine() ? register_parameter("weight", at::ones(shape))
                                        : register_parameter("weight", {}, /*requires_grad=*/false);
  bias = options.elementwise_affine() && options.bias() ? register_parameter("bias", at::zeros(shape))
                                                        : register_parameter("bias", {}, /*requires_grad=*/false);
}

void LayerNormImpl::pretty_print(std::ostream& stream) const {
  stream << "matterhorn::snn::LayerNorm(" << c10::IntArrayRef(options.normalized_shape()) << ", eps=" << options.eps()
         << ", elementwise_affine=" << std::boolalpha << options.elementwise_affine() << ")";
}

at::Tensor LayerNormImpl::forward(const at::Tensor& input) {
  return ops::layer_norm(input, options.normalized_shape(), optional(weight), optional(bias), options.eps());
}

}  // namespace matterhorn::snn
