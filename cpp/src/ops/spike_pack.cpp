// matterhorn::pack_spikes and matterhorn::unpack_spikes: schemas, shared checks and the calls
// through the dispatcher (see ops/spike_pack.h). Kernels: cpu/spike_pack_kernel.cpp,
// cuda/spike_pack_kernel.cu, meta/spike_pack_meta.cpp.
#include "ops/spike_pack.h"

#include <algorithm>
#include <vector>

#include <c10/util/safe_numerics.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include "matterhorn/ops/spike.h"
#include "ops/checks.h"

namespace matterhorn::ops {
namespace detail {

c10::SymDimVector packed_strides(const at::Tensor& input) {
  if (input.is_non_overlapping_and_dense()) return {input.sym_strides().begin(), input.sym_strides().end()};
  c10::SymDimVector strides(input.dim());
  c10::SymInt stride = 1;
  for (int64_t d = input.dim() - 1; d >= 0; --d) {
    strides[d] = stride;
    stride = stride * input.sym_size(d).max(1);
  }
  return strides;
}

void check_pack_spikes(const at::Tensor& input, std::string_view layer) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()), layer, ": pack_spikes expects a floating-point input, got ",
      dtype_name(input.scalar_type()));
}

void check_unpack_spikes(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
    c10::SymIntArrayRef stride, at::ScalarType dtype, std::string_view layer) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(dtype), layer, ": unpack_spikes makes a floating-point tensor, not ", dtype_name(dtype));
  TORCH_CHECK_VALUE(
      size.size() == stride.size(), layer, ": unpack_spikes needs one stride per size, got size ", size,
      " and stride ", stride);
  c10::SymInt n = 1;
  for (const auto& s : size) {
    TORCH_CHECK_VALUE(s >= 0, layer, ": unpack_spikes got a negative size ", size);
    const auto known_n = n.maybe_as_int(), known_s = s.maybe_as_int();
    int64_t product = 0;
    TORCH_CHECK_VALUE(
        !(known_n && known_s && c10::mul_overflows(*known_n, *known_s, &product)), layer,
        ": unpack_spikes got a size whose number of values overflows int64: ", size);
    n = n * s;
  }
  TORCH_CHECK_TYPE(
      bits.scalar_type() == at::kByte, layer, ": unpack_spikes expects uint8 bits, got ",
      dtype_name(bits.scalar_type()));
  TORCH_CHECK_VALUE(
      bits.dim() == 1 && bits.sym_size(0) == packed_bytes(n), layer, ": unpack_spikes expects bits of shape [",
      packed_bytes(n), "] for size ", size, ", got ", bits.sym_sizes());
  // The layout pack_spikes can produce: a permutation of a contiguous one (every value once).
  std::vector<int64_t> order(size.size());
  for (const auto d : c10::irange(size.size())) order[d] = static_cast<int64_t>(d);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return stride[a] == stride[b] ? a > b : stride[a] > stride[b];
  });
  c10::SymInt expected = 1;
  bool dense = true;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    if (size[*it] == 1) continue;
    dense = dense && stride[*it] == expected;
    expected = expected * size[*it];
  }
  TORCH_CHECK_VALUE(
      dense || n == 0, layer, ": unpack_spikes needs a non-overlapping dense stride, got size ", size, " and stride ",
      stride);
  if (invalid.has_value() && invalid->defined()) {
    TORCH_CHECK_TYPE(
        invalid->scalar_type() == at::kByte, layer, ": unpack_spikes expects `invalid` as a uint8 scalar, got ",
        dtype_name(invalid->scalar_type()));
    TORCH_CHECK_VALUE(
        invalid->dim() == 0 && invalid->device() == bits.device(), layer,
        ": unpack_spikes expects `invalid` as a uint8 scalar on the bits' device, got shape ", invalid->sym_sizes(),
        " on ", invalid->device());
  }
}

std::tuple<at::Tensor, at::Tensor> call_pack_spikes(const at::Tensor& input, std::string_view layer) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::pack_spikes", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view)>();
  return op.call(input, layer);
}

at::Tensor call_unpack_spikes(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
    c10::SymIntArrayRef stride, at::ScalarType dtype, std::string_view layer) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("matterhorn::unpack_spikes", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
                            c10::SymIntArrayRef, at::ScalarType, c10::string_view)>();
  return op.call(bits, invalid, size, stride, dtype, layer);
}

}  // namespace detail

std::tuple<at::Tensor, at::Tensor> pack_spikes(const at::Tensor& input) {
  return detail::call_pack_spikes(input, "pack_spikes");
}

at::Tensor unpack_spikes(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, at::IntArrayRef size, at::IntArrayRef stride,
    at::ScalarType dtype) {
  return detail::call_unpack_spikes(
      bits, invalid, c10::fromIntArrayRefSlow(size), c10::fromIntArrayRefSlow(stride), dtype, "unpack_spikes");
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def("pack_spikes(Tensor input, str layer=\"pack_spikes\") -> (Tensor bits, Tensor invalid)");
  m.def(
      "unpack_spikes(Tensor bits, Tensor? invalid, SymInt[] size, SymInt[] stride, ScalarType dtype, "
      "str layer=\"unpack_spikes\") -> Tensor");
}
