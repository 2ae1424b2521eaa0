#pragma once
// Internal pieces of the spike pack / unpack ops, shared by their kernels (CPU, CUDA, Meta) and by
// the spike_input synapses (ops/autograd/spike_synapse_autograd.cpp).
//
//   pack_spikes(x, layer)  -> bits (uint8 [ceil(n / 8)]), invalid (uint8 [], 1 if x held a value
//                             other than 0 and 1). Value k of x in memory order (x itself when it is
//                             non-overlapping and dense, else x.contiguous()) is bit k % 8 of byte
//                             k / 8. The CPU kernel raises a ValueError naming `layer` at once; the
//                             CUDA kernel only sets `invalid` (no host synchronisation).
//   unpack_spikes(bits, invalid, size, stride, dtype, layer) -> the 0/1 tensor of that size,
//                             stride (non-overlapping and dense) and dtype, filled in memory order.
//                             A set `invalid` is a ValueError naming `layer` (on CUDA this reads one
//                             byte: the one host synchronisation, in backward).
#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/Exception.h>

namespace matterhorn::ops::detail {

// The bytes that hold n bits.
inline c10::SymInt packed_bytes(const c10::SymInt& n) { return (n + 7) / 8; }

// The strides in which pack_spikes lays out the values of `input` (see above).
c10::SymDimVector packed_strides(const at::Tensor& input);

// pack_spikes' checks: a floating-point input.
void check_pack_spikes(const at::Tensor& input, std::string_view layer);

// unpack_spikes' checks: bits uint8 [ceil(n / 8)], invalid uint8 [] on the same device, a size and
// non-overlapping dense stride of one rank, a floating-point dtype.
void check_unpack_spikes(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
    c10::SymIntArrayRef stride, at::ScalarType dtype, std::string_view layer);

// The error every kernel raises for a value other than 0 and 1.
[[noreturn]] inline void fail_not_spikes(std::string_view layer) {
  TORCH_CHECK_VALUE(
      false, layer, ": spike_input=True expects an input of spikes, only 0 and 1, but it holds another value "
      "(e.g. 0.5, 2, -1 or NaN); pass spikes or construct the layer with spike_input=False");
}

// The ops through the dispatcher.
std::tuple<at::Tensor, at::Tensor> call_pack_spikes(const at::Tensor& input, std::string_view layer);
at::Tensor call_unpack_spikes(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
    c10::SymIntArrayRef stride, at::ScalarType dtype, std::string_view layer);

}  // namespace matterhorn::ops::detail
