#pragma once
// pack_spikes / unpack_spikes CUDA kernels and their launch sequences (see ops/spike_pack.h).
// Compiled by nvcc for the GPU (spike_pack_kernel.cu) and, so that tests without a GPU run this
// very code, by the host compiler under tests/emulation/cuda_on_cpu.h; launches go through a
// `Launch` object for that reason.
//
// One thread per 32 values (one uint32 word of bits): it loads them as 16-byte vectors when the
// input is 16-byte aligned, and a value other than 0 and 1 makes it write 1 to the `invalid` flag
// (every writer writes the same byte: no atomics). Nothing is read back on the host in forward;
// unpack reads the flag (one byte) before it unpacks, in backward.
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>

#include "ops/spike_pack.h"

// The CPU emulation defines MATTERHORN_TRACE_ACCESS(address, bytes, is_store) to see what the kernels move.
#ifndef MATTERHORN_TRACE_ACCESS
#define MATTERHORN_TRACE_ACCESS(address, bytes, is_store)
#endif

namespace matterhorn::ops::cuda::spikes {

constexpr int kThreads = 256;
constexpr int64_t kValuesPerThread = 32;

// 16 bytes of values, loaded or stored by one instruction.
template <typename T>
struct alignas(16) Vector16 {
  static constexpr int kSize = 16 / sizeof(T);
  T value[kSize];
};

template <typename T>
__device__ __forceinline__ Vector16<T> load16(const T* p) {
  MATTERHORN_TRACE_ACCESS(p, 16, false);
  return *reinterpret_cast<const Vector16<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const Vector16<T>& v) {
  MATTERHORN_TRACE_ACCESS(p, 16, true);
  *reinterpret_cast<Vector16<T>*>(p) = v;
}

// Thread t packs values [32 t, 32 t + 32) into bytes [4 t, 4 t + 4) (fewer at the end).
template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const scalar_t* __restrict__ x, uint8_t* __restrict__ bits, uint8_t* __restrict__ invalid, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = t * kValuesPerThread;
  if (first >= n) return;
  uint32_t word = 0;
  bool other = false;
  const auto add = [&](scalar_t value, int k) {
    const acc_t v = static_cast<acc_t>(value);
    word |= static_cast<uint32_t>(v == acc_t(1)) << k;
    other |= v != acc_t(0) && v != acc_t(1);
  };
  const bool whole = first + kValuesPerThread <= n;
  if (kVectorized && whole) {
    constexpr int kSize = Vector16<scalar_t>::kSize;
#pragma unroll
    for (int k = 0; k < kValuesPerThread; k += kSize) {
      const Vector16<scalar_t> v = load16(x + first + k);
#pragma unroll
      for (int j = 0; j < kSize; ++j) add(v.value[j], k + j);
    }
  } else {
    for (int k = 0; k < kValuesPerThread && first + k < n; ++k) add(x[first + k], k);
  }
  if (other) *invalid = 1;
  if (whole) {
    MATTERHORN_TRACE_ACCESS(bits + 4 * t, 4, true);
    *reinterpret_cast<uint32_t*>(bits + 4 * t) = word;
  } else {
    for (int64_t b = 0; b * 8 < n - first; ++b) bits[4 * t + b] = static_cast<uint8_t>(word >> (8 * b));
  }
}

// Thread t unpacks bytes [4 t, 4 t + 4) into values [32 t, 32 t + 32) (fewer at the end).
template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const uint8_t* __restrict__ bits, scalar_t* __restrict__ y, int64_t n) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = t * kValuesPerThread;
  if (first >= n) return;
  const bool whole = first + kValuesPerThread <= n;
  uint32_t word = 0;
  if (kVectorized && whole) {
    MATTERHORN_TRACE_ACCESS(bits + 4 * t, 4, false);
    word = *reinterpret_cast<const uint32_t*>(bits + 4 * t);
    constexpr int kSize = Vector16<scalar_t>::kSize;
#pragma unroll
    for (int k = 0; k < kValuesPerThread; k += kSize) {
      Vector16<scalar_t> v;
#pragma unroll
      for (int j = 0; j < kSize; ++j) v.value[j] = static_cast<scalar_t>((word >> (k + j)) & 1u);
      store16(y + first + k, v);
    }
  } else {
    for (int64_t b = 0; b * 8 < n - first && b < 4; ++b) word |= static_cast<uint32_t>(bits[4 * t + b]) << (8 * b);
    for (int k = 0; k < kValuesPerThread && first + k < n; ++k) y[first + k] = static_cast<scalar_t>((word >> k) & 1u);
  }
}

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(at::ceil_div(at::ceil_div(n, kValuesPerThread), static_cast<int64_t>(kThreads)));
}

inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> launch_pack(const at::Tensor& input, std::string_view layer, const Launch& launch) {
  detail::check_pack_spikes(input, layer);
  const at::Tensor x = input.is_non_overlapping_and_dense() ? input : input.contiguous();
  const int64_t n = x.numel();
  const auto options = x.options().dtype(at::kByte);
  at::Tensor bits = at::empty({(n + 7) / 8}, options);
  at::Tensor invalid = at::zeros({}, options);
  if (n == 0) return {bits, invalid};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pack_spikes", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    const auto kernel = aligned(data, 16) ? pack_kernel<scalar_t, true> : pack_kernel<scalar_t, false>;
    launch(kernel, dim3(blocks_for(n)), dim3(kThreads), data, bits.mutable_data_ptr<uint8_t>(),
           invalid.mutable_data_ptr<uint8_t>(), n);
  });
  return {bits, invalid};
}

// read_flag(invalid) -> the flag's value on the host (on the GPU: a one-byte copy, the only
// synchronisation of a spike synapse, made in backward).
template <typename Launch, typename ReadFlag>
at::Tensor launch_unpack(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
    c10::SymIntArrayRef stride, at::ScalarType dtype, std::string_view layer, const Launch& launch,
    ReadFlag&& read_flag) {
  detail::check_unpack_spikes(bits, invalid, size, stride, dtype, layer);
  if (invalid.has_value() && invalid->defined() && read_flag(*invalid) != 0) detail::fail_not_spikes(layer);
  at::Tensor y = at::empty_strided(C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride),
                                   bits.options().dtype(dtype));
  const int64_t n = y.numel();
  if (n == 0) return y;
  const at::Tensor b = bits.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack_spikes", [&] {
    const uint8_t* source = b.const_data_ptr<uint8_t>();
    scalar_t* data = y.mutable_data_ptr<scalar_t>();
    const bool vectorized = aligned(source, 4) && aligned(data, 16);
    const auto kernel = vectorized ? unpack_kernel<scalar_t, true> : unpack_kernel<scalar_t, false>;
    launch(kernel, dim3(blocks_for(n)), dim3(kThreads), source, data, n);
  });
  return y;
}

}  // namespace matterhorn::ops::cuda::spikes
