#pragma once
// The CPU kernels with vector loops (cpu/batch_norm_kernel.cpp, cpu/layer_norm_kernel.cpp,
// cpu/weight_standardize_kernel.cpp) are compiled once per capability: DEFAULT (the x86-64
// baseline, or whatever the target's baseline is), AVX2 and AVX512 on x86-64. Each build hands
// its kernels over as a table; cpu/dispatch.cpp registers the ops once and calls the table of the
// best capability the CPU has, as ATen chooses its own: ATEN_CPU_CAPABILITY=default|avx2|avx512
// lowers both, so every build can be tested and timed on one machine.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace matterhorn::ops::cpu {

enum class Capability { DEFAULT, AVX2, AVX512 };

// The capability whose kernels run in this process (decided on first use).
Capability kernel_capability();
const char* capability_name(Capability capability);

// The building blocks of ops/batch_norm.h.
struct BatchNormKernels {
  std::tuple<at::Tensor, at::Tensor> (*stats)(const at::Tensor& input, int64_t groups);
  at::Tensor (*elemt)(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                      int64_t groups, const std::optional<at::Tensor>& scale);
  std::tuple<at::Tensor, at::Tensor> (*backward_reduce)(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& mean, int64_t groups);
  at::Tensor (*backward_elemt)(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& var, const std::optional<at::Tensor>& weight,
                               const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
                               c10::SymInt count, int64_t groups, const std::optional<at::Tensor>& scale);
  void (*update_stats)(const at::Tensor& mean, const at::Tensor& var, c10::SymInt count,
                       const at::Tensor& running_mean, const at::Tensor& running_var,
                       const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum);
};

// The building blocks of ops/layer_norm.h.
struct LayerNormKernels {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*normalize)(
      const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, double eps);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*backward)(
      const at::Tensor& grad_output, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
      const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight);
};

// The building blocks of ops/weight_standardize.h.
struct WeightStandardizeKernels {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*forward)(
      const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
      double eps);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*backward)(
      const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
      const std::optional<at::Tensor>& gamma);
};

// pack_spikes / unpack_spikes (ops/spike_pack.h).
struct SpikePackKernels {
  std::tuple<at::Tensor, at::Tensor> (*pack)(const at::Tensor& input, c10::string_view layer);
  at::Tensor (*unpack)(const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
                       c10::SymIntArrayRef stride, at::ScalarType dtype, c10::string_view layer);
};

// Defined by each capability's build of the kernel files.
template <Capability>
const BatchNormKernels& batch_norm_kernels();
template <Capability>
const LayerNormKernels& layer_norm_kernels();
template <Capability>
const SpikePackKernels& spike_pack_kernels();
template <Capability>
const WeightStandardizeKernels& weight_standardize_kernels();

}  // namespace matterhorn::ops::cpu
