#pragma once
// Tensors cross into _C as DLPack capsules (torch.utils.dlpack.to_dlpack / from_dlpack), so _C
// needs neither libtorch_python nor torch's copy of pybind11. Zero-copy both ways.
#include <ATen/DLConvertor.h>
#include <pybind11/pybind11.h>

namespace matterhorn::python {

inline at::Tensor tensor_from_capsule(const pybind11::capsule& capsule) {
  // The DLPack protocol: a consumer renames the capsule so its destructor leaves the tensor alone.
  if (PyCapsule_IsValid(capsule.ptr(), "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    PyCapsule_SetName(capsule.ptr(), "used_dltensor");
    return at::fromDLPack(managed);
  }
  if (PyCapsule_IsValid(capsule.ptr(), "dltensor_versioned")) {
    auto* managed = static_cast<DLManagedTensorVersioned*>(
        PyCapsule_GetPointer(capsule.ptr(), "dltensor_versioned"));
    PyCapsule_SetName(capsule.ptr(), "used_dltensor_versioned");
    return at::fromDLPackVersioned(managed);
  }
  throw pybind11::type_error(
      "expected an unused DLPack capsule (torch.utils.dlpack.to_dlpack(tensor))");
}

inline pybind11::capsule tensor_to_capsule(const at::Tensor& tensor) {
  DLManagedTensor* managed = at::toDLPack(tensor);
  return pybind11::capsule(managed, "dltensor", [](PyObject* object) {
    // Still named "dltensor": nobody consumed it, so it is ours to free.
    if (PyCapsule_IsValid(object, "dltensor")) {
      auto* unused = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(object, "dltensor"));
      unused->deleter(unused);
    }
  });
}

}  // namespace matterhorn::python
