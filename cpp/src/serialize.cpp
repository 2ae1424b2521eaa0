#include "matterhorn/serialize.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <vector>

#include <caffe2/serialize/inline_container.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/jit/serialization/unpickler.h>

namespace matterhorn {
namespace {

// The first line of an exception's message, without torch's C++ backtrace.
std::string reason(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  const std::string text = c10_error ? c10_error->what_without_backtrace() : error.what();
  return text.substr(0, text.find('\n'));
}

// The bytes a tensor addresses in its storage: (offset + sum((size - 1) * stride) + 1) elements,
// or none when it has no elements. False when that does not fit in 64 bits.
bool addressed_bytes(const at::Tensor& tensor, uint64_t& bytes) {
  if (tensor.numel() == 0) {
    bytes = 0;
    return true;
  }
  uint64_t last = static_cast<uint64_t>(tensor.storage_offset());
  for (int64_t dim = 0; dim < tensor.dim(); ++dim) {
    uint64_t step = 0;
    if (__builtin_mul_overflow(static_cast<uint64_t>(tensor.size(dim) - 1), static_cast<uint64_t>(tensor.stride(dim)), &step) ||
        __builtin_add_overflow(last, step, &last)) {
      return false;
    }
  }
  return !__builtin_add_overflow(last, uint64_t{1}, &last) &&
         !__builtin_mul_overflow(last, static_cast<uint64_t>(tensor.element_size()), &bytes);
}

// The size of each storage record read from the file, by the address of its data.
using RecordSizes = std::map<const void*, size_t>;

// A tensor as torch's unpickler made it: its sizes, strides and storage size come from the pickle
// and its data from the record, unchecked against each other. Nothing has read its values yet.
void check_record(const at::Tensor& tensor, const std::string& entry, const std::string& path,
                  const RecordSizes& records) {
  const std::string where = entry + " in '" + path + "'";
  TORCH_CHECK_VALUE(tensor.layout() == at::kStrided && !tensor.is_quantized(), where,
                    " is not a dense tensor (layout ", tensor.layout(), ", dtype ", tensor.scalar_type(),
                    "); only dense tensors can be read");
  TORCH_CHECK_VALUE(tensor.storage_offset() >= 0, where, " has a negative storage offset");
  for (int64_t dim = 0; dim < tensor.dim(); ++dim) {
    TORCH_CHECK_VALUE(tensor.size(dim) >= 0 && tensor.stride(dim) >= 0, where, " has shape ", tensor.sizes(),
                      " and strides ", tensor.strides(), ": sizes and strides must not be negative");
  }
  uint64_t needed = 0;
  TORCH_CHECK_VALUE(addressed_bytes(tensor, needed), where, " has shape ", tensor.sizes(), " and strides ",
                    tensor.strides(), ", which address more bytes than a file can hold");
  if (needed == 0) return;  // no values to read (an empty storage has no data pointer to look up)
  const auto record = records.find(tensor.storage().data());
  TORCH_CHECK_VALUE(record != records.end(), where, " has no storage record of its own");
  const size_t held = std::min(record->second, tensor.storage().nbytes());
  TORCH_CHECK_VALUE(needed <= held, where, ": its record holds ",
                    held, " bytes but a ", tensor.scalar_type(), " tensor of shape ", tensor.sizes(), " (strides ",
                    tensor.strides(), ", offset ", tensor.storage_offset(), ") needs ", needed,
                    "; the file is truncated or damaged");
}

std::string key_name(const c10::IValue& key) {
  if (key.isString()) return "'" + key.toStringRef() + "'";
  if (key.isInt()) return std::to_string(key.toInt());
  return "<" + key.tagKind() + " key>";
}

// Checks every tensor inside `value` (dicts, lists and tuples are walked; other values are left).
void check_records(const c10::IValue& value, const std::string& entry, const std::string& path,
                   const RecordSizes& records) {
  if (value.isTensor()) {
    check_record(value.toTensor(), entry.empty() ? "the tensor" : entry, path, records);
  } else if (value.isGenericDict()) {
    for (const auto& item : value.toGenericDict()) {
      check_records(item.value(), entry + (entry.empty() ? "" : "[") + key_name(item.key()) + (entry.empty() ? "" : "]"),
                    path, records);
    }
  } else if (value.isList() || value.isTuple()) {
    const std::vector<c10::IValue> items =
        value.isList() ? value.toList().vec() : std::vector<c10::IValue>(value.toTupleRef().elements().begin(),
                                                                         value.toTupleRef().elements().end());
    for (size_t i = 0; i < items.size(); ++i) check_records(items[i], entry + "[" + std::to_string(i) + "]", path, records);
  }
}

// load_pickle, with `hint` appended to the message when the file is not a readable torch.save file.
// What torch::jit::pickle_load does, with the size of every record kept for check_records.
c10::IValue load_checked(const std::string& path, const char* hint) {
  TORCH_CHECK_VALUE(std::ifstream(path, std::ios::binary).good(), "cannot open '", path, "': ", std::strerror(errno));
  RecordSizes records;
  c10::IValue loaded;
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    auto [pickle, pickle_size] = reader.getRecord("data.pkl");
    size_t pickle_read = 0;
    auto read_pickle = [&, data = static_cast<const char*>(pickle.get())](char* buffer, size_t length) -> size_t {
      length = std::min(length, pickle_size - pickle_read);
      std::memcpy(buffer, data + pickle_read, length);
      pickle_read += length;
      return length;
    };
    auto read_record = [&](const std::string& name) {
      auto [data, size] = reader.getRecord("data/" + name);
      records[data.get()] = size;
      return std::move(data);
    };
    torch::jit::Unpickler unpickler(read_pickle, nullptr, nullptr, read_record, std::nullopt);
    unpickler.set_version(reader.version());
    loaded = unpickler.parse_ivalue();
  } catch (const std::exception& error) {
    TORCH_CHECK_VALUE(false, "'", path, "' cannot be read as a file written by torch.save (", reason(error), ")",
                      hint);
  }
  check_records(loaded, "", path, records);
  return loaded;
}

bool same_kind(at::ScalarType a, at::ScalarType b) {
  if (a == at::kBool || b == at::kBool) return a == b;
  return (at::isFloatingType(a) && at::isFloatingType(b)) || (at::isComplexType(a) && at::isComplexType(b)) ||
         (at::isIntegralType(a, false) && at::isIntegralType(b, false));
}

}  // namespace

c10::IValue load_pickle(const std::string& path) { return load_checked(path, ""); }

at::Tensor load_tensor(const std::string& path) {
  const c10::IValue loaded = load_pickle(path);
  TORCH_CHECK_VALUE(loaded.isTensor(), "'", path, "' holds a ", loaded.tagKind(),
                    ", not a tensor; save it with torch.save(tensor, path)");
  return loaded.toTensor();
}

void load_state_dict(torch::nn::Module& module, const std::string& path) {
  // torch's C++ unpickler reads plain dicts but not the OrderedDict that state_dict() returns.
  const char* how = "; save it from Python with matterhorn_pytorch.save_state_dict(model, path)";
  c10::IValue loaded;
  try {
    loaded = load_checked(path, how);
  } catch (const c10::ValueError& error) {
    TORCH_CHECK_VALUE(false, "load_state_dict: ", error.what_without_backtrace());
  }
  TORCH_CHECK_VALUE(loaded.isGenericDict(), "load_state_dict: '", path, "' holds a ", loaded.tagKind(),
                    ", not a dict of tensors", how);

  auto targets = module.named_parameters(/*recurse=*/true);
  for (const auto& buffer : module.named_buffers(/*recurse=*/true)) targets.insert(buffer.key(), buffer.value());
  std::set<std::string> missing;
  for (const auto& target : targets) missing.insert(target.key());

  // Everything is checked before the first copy, so that a bad file leaves the module as it was.
  std::vector<std::pair<at::Tensor*, at::Tensor>> copies;
  for (const auto& entry : loaded.toGenericDict()) {
    TORCH_CHECK_VALUE(entry.key().isString(), "load_state_dict: '", path, "' has a key of type ", entry.key().tagKind(),
                      "; the keys must be parameter names");
    const std::string& name = entry.key().toStringRef();
    at::Tensor* target = targets.find(name);
    TORCH_CHECK_VALUE(target != nullptr, "load_state_dict: unexpected key '", name, "' in '", path, "'");
    TORCH_CHECK_VALUE(entry.value().isTensor(), "load_state_dict: '", name, "' in '", path, "' is a ",
                      entry.value().tagKind(), ", not a tensor");
    const at::Tensor value = entry.value().toTensor();
    TORCH_CHECK_VALUE(target->sizes() == value.sizes(), "load_state_dict: '", name, "' has shape ", value.sizes(),
                      " in the file but ", target->sizes(), " in the model");
    TORCH_CHECK_VALUE(same_kind(target->scalar_type(), value.scalar_type()), "load_state_dict: '", name, "' in '",
                      path, "' is ", value.scalar_type(), " but ", target->scalar_type(), " in the model");
    copies.emplace_back(target, value);
    missing.erase(name);
  }
  TORCH_CHECK_VALUE(
      missing.empty(), "load_state_dict: '", path, "' lacks ", missing.size(), " key(s), the first '",
      missing.empty() ? "" : *missing.begin(), "'");

  const torch::NoGradGuard no_grad;
  for (auto& [target, value] : copies) target->copy_(value);
}

}  // namespace matterhorn
