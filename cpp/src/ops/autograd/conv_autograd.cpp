// Autograd kernels of matterhorn::conv / conv_transpose. The computation (fold, pad, one
// at::convolution, unfold) is made of ATen views and ops that carry their own derivatives, so
// the Autograd kernel is the same code called above autograd: the graph it records is torch's
// own (ConvolutionBackward0, cuDNN / oneDNN backward, double backward, forward AD), the same
// graph as torch.nn on the folded tensor. A custom autograd::Function here cost about 10 us
// more per step for the same arithmetic.
#include <torch/library.h>

#include "ops/conv.h"

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  using namespace matterhorn::ops::detail;
  m.impl("conv", &conv_kernel<&aten_convolution>);
  m.impl("conv_transpose", &conv_transpose_kernel<&aten_convolution>);
}
