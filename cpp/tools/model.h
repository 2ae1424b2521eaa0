#pragma once
// A model loaded in a program with no Python: a TorchScript file (.pt, torch.jit.save) or an
// AOTInductor package (.pt2, torch._inductor.aoti_compile_and_package). Callable from many
// threads at once; each call runs under c10::InferenceMode.
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/import.h>

namespace matterhorn::tools {

// The model ran but returned something other than one tensor: a property of the model file, not
// of the input.
struct ModelOutputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Model {
 public:
  explicit Model(const std::string& path) {
    if (path.size() >= 4 && path.compare(path.size() - 4, 4, ".pt2") == 0) {
      package_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
    } else {
      script_ = torch::jit::load(path);
      script_->eval();
    }
  }

  at::Tensor operator()(const at::Tensor& input) {
    const c10::InferenceMode inference;
    if (package_) {
      std::vector<at::Tensor> outputs = package_->run({input});
      if (outputs.empty()) throw ModelOutputError("the model returned no tensor");
      return outputs[0];
    }
    const c10::IValue output = script_->forward({input});
    if (!output.isTensor()) throw ModelOutputError("the model returned a " + output.tagKind() + ", not a tensor");
    return output.toTensor();
  }

 private:
  std::optional<torch::jit::Module> script_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package_;
};

}  // namespace matterhorn::tools
