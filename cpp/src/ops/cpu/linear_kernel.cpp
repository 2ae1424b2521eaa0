// CPU kernel of matterhorn::linear: the folded GEMM through ATen (oneDNN/MKL do the arithmetic).
#include <torch/library.h>

#include "ops/linear.h"

TORCH_LIBRARY_IMPL(matterhorn, CPU, m) {
  m.impl("linear", &matterhorn::ops::detail::checked_linear);
}
