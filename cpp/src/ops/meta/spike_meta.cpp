// Meta kernels of pack_spikes / unpack_spikes and spike_linear: checks, shapes and dtypes only
// (spike_conv and spike_conv_transpose run their composite kernel on meta tensors).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include "ops/linear.h"
#include "ops/spike_pack.h"

namespace {

using namespace matterhorn::ops::detail;

std::tuple<at::Tensor, at::Tensor> pack_meta(const at::Tensor& input, c10::string_view layer) {
  check_pack_spikes(input, layer);
  const auto options = input.options().dtype(at::kByte);
  return {at::empty_symint({packed_bytes(input.sym_numel())}, options), at::empty({}, options)};
}

at::Tensor unpack_meta(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
    c10::SymIntArrayRef stride, at::ScalarType dtype, c10::string_view layer) {
  check_unpack_spikes(bits, invalid, size, stride, dtype, layer);
  return at::empty_strided_symint(size, stride, bits.options().dtype(dtype));
}

at::Tensor spike_linear_meta(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_arguments(input, weight, bias);
  return at::empty_symint(linear_output_sizes(input, weight), input.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, Meta, m) {
  m.impl("pack_spikes", &pack_meta);
  m.impl("unpack_spikes", &unpack_meta);
  m.impl("spike_linear", &spike_linear_meta);
}
