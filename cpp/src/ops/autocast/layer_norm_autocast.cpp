// Autocast kernel of matterhorn::layer_norm on CUDA: compute in float32, as torch's layer_norm
// does there. On the CPU torch's autocast leaves layer_norm alone (a bfloat16 input meets the
// float32 parameters, which the op accepts): so does ours.
#include <torch/library.h>

#include "ops/autocast/autocast.h"

namespace {

using namespace matterhorn::ops::detail;
constexpr char kLayerNorm[] = "matterhorn::layer_norm";
using LayerNormSignature = at::Tensor(
    const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    double);

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, AutocastCUDA, m) {
  m.impl("layer_norm", fp32_kernel<c10::DeviceType::CUDA, kLayerNorm, LayerNormSignature>);
}
