// Autocast kernels of matterhorn::linear: compute in the autocast dtype, as torch's linear does.
#include <torch/library.h>

#include "ops/autocast/autocast.h"
#include "ops/linear.h"

namespace {

using namespace matterhorn::ops::detail;
constexpr char kLinear[] = "matterhorn::linear";
using LinearSignature = decltype(linear_folded);

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, AutocastCPU, m) {
  m.impl("linear", lower_precision_kernel<c10::DeviceType::CPU, kLinear, LinearSignature>);
}

TORCH_LIBRARY_IMPL(matterhorn, AutocastCUDA, m) {
  m.impl("linear", lower_precision_kernel<c10::DeviceType::CUDA, kLinear, LinearSignature>);
}
