// CPU kernels of matterhorn::conv / conv_transpose: one folded at::convolution (oneDNN).
#include <torch/library.h>

#include "ops/conv.h"

TORCH_LIBRARY_IMPL(matterhorn, CPU, m) {
  using namespace matterhorn::ops::detail;
  m.impl("conv", &conv_kernel<&aten_convolution>);
  m.impl("conv_transpose", &conv_transpose_kernel<&aten_convolution>);
}
