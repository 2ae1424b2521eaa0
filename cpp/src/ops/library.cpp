// Claims the `matterhorn` operator namespace. Each op defines its schema in its own
// ops/<op>.cpp with TORCH_LIBRARY_FRAGMENT.
#include <torch/library.h>

TORCH_LIBRARY(matterhorn, m) {}
