// Autocast kernels of matterhorn::conv / conv_transpose: compute in the autocast dtype.
#include <torch/library.h>

#include "ops/autocast/autocast.h"
#include "ops/conv.h"

namespace {

using namespace matterhorn::ops::detail;
constexpr char kConv[] = "matterhorn::conv";
constexpr char kConvTranspose[] = "matterhorn::conv_transpose";
using ConvSignature = decltype(conv_kernel);
using ConvTransposeSignature = decltype(conv_transpose_kernel);

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, AutocastCPU, m) {
  m.impl("conv", lower_precision_kernel<c10::DeviceType::CPU, kConv, ConvSignature>);
  m.impl("conv_transpose", lower_precision_kernel<c10::DeviceType::CPU, kConvTranspose, ConvTransposeSignature>);
}

TORCH_LIBRARY_IMPL(matterhorn, AutocastCUDA, m) {
  m.impl("conv", lower_precision_kernel<c10::DeviceType::CUDA, kConv, ConvSignature>);
  m.impl("conv_transpose", lower_precision_kernel<c10::DeviceType::CUDA, kConvTranspose, ConvTransposeSignature>);
}
