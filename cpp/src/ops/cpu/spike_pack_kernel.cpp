// CPU kernels of pack_spikes / unpack_spikes (see ops/spike_pack.h). 64 values make one uint64
// word: a vector compare per kLanes values, its lanes turned into bits by an AND with the lane
// weights (1, 2, 4, ...) and a sum; unpacking is the reverse (broadcast, AND, select the bits of
// 1.0). A word's 8 bytes in little-endian order are the bytes of the format. Compiled once per CPU
// capability; the ops call the build cpu/dispatch.cpp chooses.
#include <atomic>
#include <bit>
#include <cstring>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>

#include "ops/cpu/dispatch.h"
#include "ops/cpu/vectorized.h"
#include "ops/spike_pack.h"

static_assert(std::endian::native == std::endian::little, "the packed format is a word's little-endian bytes");

namespace {

using matterhorn::ops::cpu::kLanes;
using matterhorn::ops::cpu::load;
using matterhorn::ops::cpu::store;
using matterhorn::ops::cpu::sum_lanes;
using matterhorn::ops::cpu::Vec;
using matterhorn::ops::cpu::Vector;
using matterhorn::ops::detail::check_pack_spikes;
using matterhorn::ops::detail::check_unpack_spikes;
using matterhorn::ops::detail::fail_not_spikes;

constexpr int64_t kWordsPerTask = 1024;  // 65536 values: smallest parallel task

// The integer lanes a compare of Vec<acc_t> gives (-1 true, 0 false).
template <typename acc_t>
using Lane = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;
template <typename acc_t>
using Mask = typename Vector<Lane<acc_t>>::type;

// Lane j holds 1 << j.
template <typename acc_t>
Mask<acc_t> lane_weights() {
  Mask<acc_t> m{};
  for (int64_t j = 0; j < kLanes<acc_t>; ++j) m[j] = Lane<acc_t>(1) << j;
  return m;
}

template <typename scalar_t>
void pack_kernel(const scalar_t* x, uint8_t* bits, int64_t n, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Mask<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  static_assert(64 % W == 0);
  const int64_t words = n / 64;
  at::parallel_for(0, words, kWordsPerTask, [&](int64_t begin, int64_t end) {
    const M weights = lane_weights<acc_t>();
    M other{};  // lanes that saw a value other than 0 and 1
    for (int64_t w = begin; w < end; ++w) {
      const scalar_t* values = x + 64 * w;
      uint64_t word = 0;
      for (int64_t k = 0; k < 64; k += W) {
        const Vec<acc_t> v = load<acc_t>(values + k);
        const M one = v == acc_t(1);
        other |= ~(one | (v == acc_t(0)));
        const auto set = static_cast<std::make_unsigned_t<Lane<acc_t>>>(sum_lanes<Lane<acc_t>>(one & weights));
        word |= static_cast<uint64_t>(set) << k;
      }
      std::memcpy(bits + 8 * w, &word, sizeof word);
    }
    for (int64_t j = 0; j < W; ++j) {
      if (other[j] != 0) bad.store(true, std::memory_order_relaxed);
    }
  });
  for (int64_t first = 64 * words; first < n; first += 8) {  // the last bytes
    uint8_t byte = 0;
    for (int64_t j = 0; j < 8 && first + j < n; ++j) {
      const acc_t v = static_cast<acc_t>(x[first + j]);
      byte |= static_cast<uint8_t>(v == acc_t(1)) << j;
      if (v != acc_t(0) && v != acc_t(1)) bad.store(true, std::memory_order_relaxed);
    }
    bits[first / 8] = byte;
  }
}

template <typename scalar_t>
void unpack_kernel(const uint8_t* bits, scalar_t* y, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = Mask<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  constexpr uint64_t kLaneBits = (uint64_t(1) << W) - 1;
  const Lane<acc_t> one = std::bit_cast<Lane<acc_t>>(acc_t(1));
  const int64_t words = n / 64;
  at::parallel_for(0, words, kWordsPerTask, [&](int64_t begin, int64_t end) {
    const M weights = lane_weights<acc_t>();
    for (int64_t w = begin; w < end; ++w) {
      uint64_t word;
      std::memcpy(&word, bits + 8 * w, sizeof word);
      for (int64_t k = 0; k < 64; k += W) {
        const M lanes = M{} + static_cast<Lane<acc_t>>((word >> k) & kLaneBits);
        const M values = ((lanes & weights) != 0) & one;
        Vec<acc_t> v;
        std::memcpy(&v, &values, sizeof v);
        store<acc_t>(y + 64 * w + k, v);
      }
    }
  });
  for (int64_t i = 64 * words; i < n; ++i) {
    y[i] = static_cast<scalar_t>((bits[i / 8] >> (i % 8)) & 1);
  }
}

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& input, c10::string_view layer) {
  check_pack_spikes(input, layer);
  const at::Tensor x = input.is_non_overlapping_and_dense() ? input : input.contiguous();
  const int64_t n = x.numel();
  at::Tensor bits = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pack_spikes", [&] {
    pack_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), bits.mutable_data_ptr<uint8_t>(), n, bad);
  });
  if (bad.load()) fail_not_spikes(layer);  // at once on the CPU: no flag to carry to backward
  return {bits, at::zeros({}, bits.options())};
}

at::Tensor unpack_cpu(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
    c10::SymIntArrayRef stride, at::ScalarType dtype, c10::string_view layer) {
  check_unpack_spikes(bits, invalid, size, stride, dtype, layer);
  if (invalid.has_value() && invalid->defined() && invalid->item<uint8_t>() != 0) fail_not_spikes(layer);
  at::Tensor y = at::empty_strided(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride),
                                   bits.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack_spikes", [&] {
    unpack_kernel<scalar_t>(bits.contiguous().const_data_ptr<uint8_t>(), y.mutable_data_ptr<scalar_t>(), y.numel());
  });
  return y;
}

}  // namespace

template <>
const matterhorn::ops::cpu::SpikePackKernels&
matterhorn::ops::cpu::spike_pack_kernels<matterhorn::ops::cpu::Capability::MATTERHORN_CPU_CAPABILITY>() {
  static const SpikePackKernels kernels{&pack_cpu, &unpack_cpu};
  return kernels;
}
