#include "matterhorn/version.h"

#include "matterhorn/build_config.h"

namespace matterhorn {

std::string version() { return MATTERHORN_VERSION; }
std::string torch_version() { return MATTERHORN_TORCH_VERSION; }
bool with_cuda() { return MATTERHORN_WITH_CUDA != 0; }

}  // namespace matterhorn
