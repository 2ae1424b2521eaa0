#pragma once
// Shared by the hand-written autograd nodes.
#include <memory>
#include <type_traits>

#include <torch/autograd.h>

namespace matterhorn::ops::detail {

// torch 2.11 holds autograd nodes in std::shared_ptr, later releases in c10::intrusive_ptr.
template <typename T>
auto make_node() {
  using NodePointer = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePointer, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });  // torch::autograd's, found by ADL
  } else {
    return c10::make_intrusive<T>();
  }
}

}  // namespace matterhorn::ops::detail
