#include "matterhorn/version.h"

#include "matterhorn/build_config.h"
#include "ops/cpu/dispatch.h"

namespace matterhorn {

std::string version() { return MATTERHORN_VERSION; }
std::string torch_version() { return MATTERHORN_TORCH_VERSION; }
bool with_cuda() { return MATTERHORN_WITH_CUDA != 0; }
std::string cpu_capability() { return ops::cpu::capability_name(ops::cpu::kernel_capability()); }

}  // namespace matterhorn
