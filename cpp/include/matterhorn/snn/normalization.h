#pragma once
// matterhorn::snn::BatchNorm1d/2d/3d, LayerNorm and the temporal normalizations
// (ThresholdDependentBatchNorm, TemporalEffectiveBatchNorm, BatchNormThroughTime 1d/2d/3d): the
// C++ twins of the Python classes.
//
//   matterhorn::snn::BatchNorm2d bn(matterhorn::snn::BatchNorm2dOptions(64).per_step(true));
//   at::Tensor y = bn(x);  // [T, B, 64, H, W] -> [T, B, 64, H, W]; bn->eval() for inference
#include <cstddef>
#include <cstdint>
#include <optional>
#include <ostream>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include "matterhorn/snn/step_mode.h"

namespace matterhorn::snn {

struct BatchNormOptions {
  /* implicit */ BatchNormOptions(int64_t num_features) : num_features_(num_features) {}
  TORCH_ARG(int64_t, num_features);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(std::optional<double>, momentum) = 0.1;  // nullopt: cumulative moving average
  TORCH_ARG(bool, affine) = true;
  TORCH_ARG(bool, track_running_stats) = true;
  TORCH_ARG(bool, bias) = true;       // with affine: whether to learn the shift
  TORCH_ARG(bool, per_step) = false;  // statistics per time step (BNTT), affine shared
  TORCH_ARG(StepMode, step_mode) = StepMode::kMulti;  // decides BatchNorm1d's 3-D input
  TORCH_ARG(bool, batch_first) = false;
};

template <size_t D>
class C10_EXPORT BatchNormImpl : public torch::nn::Cloneable<BatchNormImpl<D>> {
 public:
  explicit BatchNormImpl(int64_t num_features) : BatchNormImpl(BatchNormOptions(num_features)) {}
  explicit BatchNormImpl(BatchNormOptions options);

  // Creates parameters (weight 1, bias 0) and buffers (running_mean 0, running_var 1,
  // num_batches_tracked 0), as torch.nn does.
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // Training: batch statistics, running statistics updated; eval: running statistics.
  at::Tensor forward(const at::Tensor& input);

  BatchNormOptions options;
  at::Tensor weight, bias;                                     // [C], undefined without affine
  at::Tensor running_mean, running_var, num_batches_tracked;  // undefined without tracking
};

struct LayerNormOptions {
  /* implicit */ LayerNormOptions(std::vector<int64_t> normalized_shape)
      : normalized_shape_(std::move(normalized_shape)) {}
  TORCH_ARG(std::vector<int64_t>, normalized_shape);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(bool, elementwise_affine) = true;
  TORCH_ARG(bool, bias) = true;
};

class C10_EXPORT LayerNormImpl : public torch::nn::Cloneable<LayerNormImpl> {
 public:
  explicit LayerNormImpl(std::vector<int64_t> normalized_shape)
      : LayerNormImpl(LayerNormOptions(std::move(normalized_shape))) {}
  explicit LayerNormImpl(LayerNormOptions options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // [T, B, ..., *normalized_shape] (or [B, ..., *normalized_shape]) -> the same shape.
  at::Tensor forward(const at::Tensor& input);

  LayerNormOptions options;
  at::Tensor weight, bias;  // normalized_shape, undefined without elementwise_affine / bias
};

// The temporal normalizations, multi-step layers over [T, B, C, ...] ([B, T, C, ...] with batch_first).
enum class TemporalNorm {
  kThresholdDependent,  // tdBN: BatchNorm, weight initialised to alpha * v_th
  kTemporalEffective,   // TEBN: BatchNorm, then step t times a learnable scale[t] ([T], ones)
  kThroughTime,         // BNTT: statistics, weight ([T, C], no bias) and running statistics ([T, C]) per step
};

struct TemporalBatchNormOptions {
  // T: time steps (TEBN, BNTT; tdBN ignores it)
  TemporalBatchNormOptions(int64_t T, int64_t num_features) : T_(T), num_features_(num_features) {}
  TORCH_ARG(int64_t, T);
  TORCH_ARG(int64_t, num_features);
  TORCH_ARG(double, alpha) = 1.0;  // tdBN: weight = alpha * v_th
  TORCH_ARG(double, v_th) = 1.0;
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(std::optional<double>, momentum) = 0.1;
  TORCH_ARG(bool, affine) = true;
  TORCH_ARG(bool, track_running_stats) = true;
  TORCH_ARG(bool, batch_first) = false;
};

template <TemporalNorm K, size_t D>
class C10_EXPORT TemporalBatchNormImpl : public torch::nn::Cloneable<TemporalBatchNormImpl<K, D>> {
 public:
  explicit TemporalBatchNormImpl(TemporalBatchNormOptions options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  at::Tensor forward(const at::Tensor& input);

  TemporalBatchNormOptions options;
  at::Tensor weight, bias, scale;                             // undefined where the layer has none
  at::Tensor running_mean, running_var, num_batches_tracked;  // undefined without tracking
};

using BatchNorm1dOptions = BatchNormOptions;
using BatchNorm2dOptions = BatchNormOptions;
using BatchNorm3dOptions = BatchNormOptions;
using BatchNorm1dImpl = BatchNormImpl<1>;
using BatchNorm2dImpl = BatchNormImpl<2>;
using BatchNorm3dImpl = BatchNormImpl<3>;
TORCH_MODULE(BatchNorm1d);
TORCH_MODULE(BatchNorm2d);
TORCH_MODULE(BatchNorm3d);
TORCH_MODULE(LayerNorm);

#define MATTERHORN_TEMPORAL_NORM(name, kind)                          \
  using name##1dImpl = TemporalBatchNormImpl<TemporalNorm::kind, 1>; \
  using name##2dImpl = TemporalBatchNormImpl<TemporalNorm::kind, 2>; \
  using name##3dImpl = TemporalBatchNormImpl<TemporalNorm::kind, 3>; \
  TORCH_MODULE(name##1d);                                             \
  TORCH_MODULE(name##2d);                                             \
  TORCH_MODULE(name##3d);                                             \
  extern template class TemporalBatchNormImpl<TemporalNorm::kind, 1>; \
  extern template class TemporalBatchNormImpl<TemporalNorm::kind, 2>; \
  extern template class TemporalBatchNormImpl<TemporalNorm::kind, 3>;
MATTERHORN_TEMPORAL_NORM(ThresholdDependentBatchNorm, kThresholdDependent)
MATTERHORN_TEMPORAL_NORM(TemporalEffectiveBatchNorm, kTemporalEffective)
MATTERHORN_TEMPORAL_NORM(BatchNormThroughTime, kThroughTime)
#undef MATTERHORN_TEMPORAL_NORM

extern template class BatchNormImpl<1>;
extern template class BatchNormImpl<2>;
extern template class BatchNormImpl<3>;

}  // namespace matterhorn::snn
