// Meta kernels of matterhorn::conv / conv_transpose: the same checks, folding and padding on
// meta tensors; at::convolution's own meta function gives the shape and memory format.
#include <torch/library.h>

#include "ops/conv.h"

TORCH_LIBRARY_IMPL(matterhorn, Meta, m) {
  using namespace matterhorn::ops::detail;
  m.impl("conv", &conv_kernel<&aten_convolution>);
  m.impl("conv_transpose", &conv_transpose_kernel<&aten_convolution>);
}
