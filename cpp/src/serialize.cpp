#include "matterhorn/serialize.h"

#include <fstream>
#include <iterator>
#include <set>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/jit/serialization/pickle.h>

namespace matterhorn {

void load_state_dict(torch::nn::Module& module, const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  TORCH_CHECK_VALUE(stream, "load_state_dict: cannot open '", path, "'");
  const std::vector<char> bytes{std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
  // torch's C++ unpickler reads plain dicts but not the OrderedDict that state_dict() returns.
  const char* how = "; save it from Python with matterhorn_pytorch.save_state_dict(model, path)";
  c10::IValue loaded;
  try {
    loaded = torch::jit::pickle_load(bytes);
  } catch (const c10::Error& error) {
    TORCH_CHECK_VALUE(false, "load_state_dict: '", path, "' cannot be read as a plain dict of tensors", how);
  }
  TORCH_CHECK_VALUE(loaded.isGenericDict(), "load_state_dict: '", path, "' holds no dict of tensors", how);

  auto targets = module.named_parameters(/*recurse=*/true);
  for (const auto& buffer : module.named_buffers(/*recurse=*/true)) targets.insert(buffer.key(), buffer.value());
  std::set<std::string> missing;
  for (const auto& target : targets) missing.insert(target.key());

  const torch::NoGradGuard no_grad;
  for (const auto& entry : loaded.toGenericDict()) {
    const std::string name = entry.key().toStringRef();
    at::Tensor* target = targets.find(name);
    TORCH_CHECK_VALUE(target != nullptr, "load_state_dict: unexpected key '", name, "' in '", path, "'");
    const at::Tensor value = entry.value().toTensor();
    TORCH_CHECK_VALUE(
        target->sizes() == value.sizes(), "load_state_dict: '", name, "' has shape ", value.sizes(),
        " in the file but ", target->sizes(), " in the model");
    target->copy_(value);
    missing.erase(name);
  }
  TORCH_CHECK_VALUE(
      missing.empty(), "load_state_dict: '", path, "' lacks ", missing.size(), " key(s), the first '",
      missing.empty() ? "" : *missing.begin(), "'");
}

}  // namespace matterhorn
