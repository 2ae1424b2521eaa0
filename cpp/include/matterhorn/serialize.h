#pragma once
// Weights saved in Python, loaded into a C++ model.
#include <string>

#include <c10/macros/Export.h>
#include <torch/nn/module.h>

namespace matterhorn {

// Loads weights saved from Python with `matterhorn_pytorch.save_state_dict(model, path)` into
// `module`, matching names ("conv.weight", "0.running_mean", ...) as nn.Module.load_state_dict
// does with strict=True: every parameter and buffer of `module` must be in the file with the
// same shape, and the file may hold nothing else. Raises c10::ValueError naming what does not match.
//
// The format: `torch.save` of a plain dict {name: tensor}, i.e. dict(model.state_dict()). A file
// of `torch.save(model.state_dict())` holds an OrderedDict, which torch's C++ unpickler cannot
// read; it is refused with a message that says how to save instead.
C10_EXPORT void load_state_dict(torch::nn::Module& module, const std::string& path);

}  // namespace matterhorn
