// Autocast kernels of spike_linear / spike_conv / spike_conv_transpose: compute in the autocast
// dtype, as their dense twins do (spikes stay exact in any floating dtype).
#include <torch/library.h>

#include "ops/autocast/autocast.h"
#include "ops/conv.h"
#include "ops/linear.h"

namespace {

using namespace matterhorn::ops::detail;
constexpr char kSpikeLinear[] = "matterhorn::spike_linear";
constexpr char kSpikeConv[] = "matterhorn::spike_conv";
constexpr char kSpikeConvTranspose[] = "matterhorn::spike_conv_transpose";
using LinearSignature = decltype(linear_folded);
using ConvSignature = decltype(conv_kernel);
using ConvTransposeSignature = decltype(conv_transpose_kernel);

template <c10::DeviceType device>
void register_kernels(torch::Library& m) {
  m.impl("spike_linear", lower_precision_kernel<device, kSpikeLinear, LinearSignature>);
  m.impl("spike_conv", lower_precision_kernel<device, kSpikeConv, ConvSignature>);
  m.impl("spike_conv_transpose", lower_precision_kernel<device, kSpikeConvTranspose, ConvTransposeSignature>);
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, AutocastCPU, m) { register_kernels<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(matterhorn, AutocastCUDA, m) { register_kernels<c10::DeviceType::CUDA>(m); }
