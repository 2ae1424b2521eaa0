// Autograd kernel of matterhorn::linear. The computation (fold, one addmm / mm, unfold) is made of
// ATen views and ops that carry their own derivatives, so the Autograd kernel is the same code
// called above autograd: the graph it records is torch's own (AddmmBackward0: double backward,
// forward AD, torch.compile traces plain aten ops), that of torch.nn.Linear on the folded
// tensor. A custom autograd::Function here cost about 10 us more per step.
#include <torch/library.h>

#include "ops/linear.h"

TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("linear", &matterhorn::ops::detail::checked_linear);
}
