// CPU registrations of the vectorised building blocks: one kernel per op, calling the build of
// the kernels for the best capability this CPU has (see cpu/dispatch.h). Compiled for the
// baseline, like the rest of the library.
#include "ops/cpu/dispatch.h"

#include <string>

#include <ATen/Version.h>
#include <torch/library.h>

namespace matterhorn::ops::cpu {

namespace {

// The builds in this library (CMake's MATTERHORN_CPU_CAPABILITIES): a capability that was not
// built falls back to the next lower one.
#if defined(MATTERHORN_CPU_HAS_AVX2)
constexpr Capability kAVX2 = Capability::AVX2;
#else
constexpr Capability kAVX2 = Capability::DEFAULT;
#endif
#if defined(MATTERHORN_CPU_HAS_AVX512)
constexpr Capability kAVX512 = Capability::AVX512;
#else
constexpr Capability kAVX512 = kAVX2;
#endif

}  // namespace

Capability kernel_capability() {
  static const Capability chosen = [] {
    // ATen's choice: the CPU's features, lowered by ATEN_CPU_CAPABILITY
    const std::string aten = at::get_cpu_capability();
    if (aten == "AVX512") return kAVX512;
    if (aten == "AVX2") return kAVX2;
    return Capability::DEFAULT;
  }();
  return chosen;
}

const char* capability_name(Capability capability) {
  switch (capability) {
    case Capability::AVX512: return "AVX512";
    case Capability::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

namespace {

// The table of the chosen capability, looked up once.
template <typename Table, const Table& (*kernels_default)(), const Table& (*kernels_avx2)(),
          const Table& (*kernels_avx512)()>
const Table& chosen_table() {
  static const Table& table = [] () -> const Table& {
    switch (kernel_capability()) {
      case Capability::AVX512: return kernels_avx512();
      case Capability::AVX2: return kernels_avx2();
      default: return kernels_default();
    }
  }();
  return table;
}

const BatchNormKernels& batch_norm() {
  return chosen_table<BatchNormKernels, &batch_norm_kernels<Capability::DEFAULT>, &batch_norm_kernels<kAVX2>,
                      &batch_norm_kernels<kAVX512>>();
}

const LayerNormKernels& layer_norm() {
  return chosen_table<LayerNormKernels, &layer_norm_kernels<Capability::DEFAULT>, &layer_norm_kernels<kAVX2>,
                      &layer_norm_kernels<kAVX512>>();
}

const WeightStandardizeKernels& weight_standardize() {
  return chosen_table<WeightStandardizeKernels, &weight_standardize_kernels<Capability::DEFAULT>,
                      &weight_standardize_kernels<kAVX2>, &weight_standardize_kernels<kAVX512>>();
}

const SpikePackKernels& spike_pack() {
  return chosen_table<SpikePackKernels, &spike_pack_kernels<Capability::DEFAULT>, &spike_pack_kernels<kAVX2>,
                      &spike_pack_kernels<kAVX512>>();
}

// A registered kernel that calls `member` of the table `table()` returns.
template <auto member, auto table>
struct Dispatched;
template <typename Table, typename Result, typename... Args, Result (*Table::*member)(Args...),
          const Table& (*table)()>
struct Dispatched<member, table> {
  static Result call(Args... args) { return (table().*member)(std::forward<Args>(args)...); }
};

}  // namespace
}  // namespace matterhorn::ops::cpu

TORCH_LIBRARY_IMPL(matterhorn, CPU, m) {
  using namespace matterhorn::ops::cpu;
  m.impl("batch_norm_stats", &Dispatched<&BatchNormKernels::stats, &batch_norm>::call);
  m.impl("batch_norm_elemt", &Dispatched<&BatchNormKernels::elemt, &batch_norm>::call);
  m.impl("batch_norm_backward_reduce", &Dispatched<&BatchNormKernels::backward_reduce, &batch_norm>::call);
  m.impl("batch_norm_backward_elemt", &Dispatched<&BatchNormKernels::backward_elemt, &batch_norm>::call);
  m.impl("batch_norm_update_stats", &Dispatched<&BatchNormKernels::update_stats, &batch_norm>::call);
  m.impl("layer_norm_normalize", &Dispatched<&LayerNormKernels::normalize, &layer_norm>::call);
  m.impl("layer_norm_backward", &Dispatched<&LayerNormKernels::backward, &layer_norm>::call);
  m.impl("pack_spikes", &Dispatched<&SpikePackKernels::pack, &spike_pack>::call);
  m.impl("unpack_spikes", &Dispatched<&SpikePackKernels::unpack, &spike_pack>::call);
  m.impl("weight_standardize_forward", &Dispatched<&WeightStandardizeKernels::forward, &weight_standardize>::call);
  m.impl("weight_standardize_backward", &Dispatched<&WeightStandardizeKernels::backward, &weight_standardize>::call);
}
