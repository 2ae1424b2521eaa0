#pragma once
// Files written by torch.save in Python, read in C++: tensors (inputs) and weights.
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/macros/Export.h>
#include <torch/nn/module.h>

namespace matterhorn {

// Reads a file written by `torch.save` (the default zip format) holding tensors, alone or inside
// dicts, lists and tuples, as torch's C++ unpickler does (`torch::jit::pickle_load`) but checked:
// torch's unpickler points each tensor at its storage record without comparing sizes, so a short
// or empty record would be read past its end. Here every tensor is checked before anything reads
// its values: non-negative sizes and strides, a strided layout, and a record holding at least the
// bytes its sizes, strides, storage offset and dtype address. Raises c10::ValueError naming the
// file and the entry ('fc.weight', [2], ...) when the file cannot be read or a record does not fit.
C10_EXPORT c10::IValue load_pickle(const std::string& path);

// load_pickle of a file holding one tensor (`torch.save(tensor, path)`); anything else in the
// file is a c10::ValueError.
C10_EXPORT at::Tensor load_tensor(const std::string& path);

// Loads weights saved from Python with `matterhorn_pytorch.save_state_dict(model, path)` into
// `module`, matching names ("conv.weight", "0.running_mean", ...) as nn.Module.load_state_dict
// does with strict=True: every parameter and buffer of `module` must be in the file with the
// same shape and a dtype of the same kind (floating point for floating point, integer for
// integer), and the file may hold nothing else. The file is read with load_pickle, so its records
// are checked too. Raises c10::ValueError naming the key and the file when something does not
// match; `module` is left unchanged then.
//
// The format: `torch.save` of a plain dict {name: tensor}, i.e. dict(model.state_dict()). A file
// of `torch.save(model.state_dict())` holds an OrderedDict, which torch's C++ unpickler cannot
// read; it is refused with a message that says how to save instead.
C10_EXPORT void load_state_dict(torch::nn::Module& module, const std::string& path);

}  // namespace matterhorn
