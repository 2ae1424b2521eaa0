#pragma once
// BatchNorm's CUDA kernels and their launch sequences (the building blocks of ops/batch_norm.h).
// Compiled by nvcc for the GPU (batch_norm_kernel.cu) and, so that tests without a GPU run this
// very code, by the host compiler under tests/emulation/cuda_on_cpu.h, which plays each block's
// threads as fibers on the CPU. Launches go through a `Launch` object for that reason.
//
// Design for bandwidth: the folded input is [G, R, C, I] (element ((g * R + r) * C + c) * I + i);
// I is the spatial size of a contiguous input and 1 for channels_last ones (R then counts rows
// and positions). Threads load 16-byte vectors along I ("plane" tiling: blocks own slices of one
// (g, c) plane) or, when I = 1, along C (a thread owns 16 bytes of channels and walks rows).
// Either way a thread's group and channels are fixed, so per-channel constants are computed once
// per thread, and reductions leave one partial result per block and (g, c), merged in a fixed
// order by a second kernel (results are the same from run to run).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ceil_div.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/llvmMathExtras.h>

#include "ops/batch_norm.h"

namespace matterhorn::ops::cuda {

using detail::BatchNormLayout;
using detail::Moments;
using at::ceil_div;

constexpr int kThreads = 256;
constexpr int64_t kBlocksPerMultiprocessor = 32;  // several waves: 3-7 blocks fit an SM (74-36 registers)
constexpr int64_t kMinVectorsPerThread = 4;       // fewer, and a block's start costs more than its loads
constexpr int64_t kMaxGridYZ = 65535;

// Up to 16 bytes of consecutive values, loaded or stored by one instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T value[N];
};

// The CPU emulation defines MATTERHORN_TRACE_ACCESS(address, bytes, is_store) to see what the kernels move.
#ifndef MATTERHORN_TRACE_ACCESS
#define MATTERHORN_TRACE_ACCESS(address, bytes, is_store)
#endif

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  MATTERHORN_TRACE_ACCESS(p, sizeof(Pack<T, N>), false);
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& pack) {
  MATTERHORN_TRACE_ACCESS(p, sizeof(Pack<T, N>), true);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

template <typename acc_t>
__device__ __forceinline__ acc_t inverse_sqrt(acc_t v) {
#ifdef __CUDA_ARCH__
  return ::rsqrt(v);
#else
  return acc_t(1) / std::sqrt(v);
#endif
}

// sum(dy) and sum(dy * (x - mean)), the backward reduction's partial result.
template <typename acc_t>
struct Sums {
  acc_t dy = 0, dy_xmu = 0;
  C10_HOST_DEVICE void merge(const Sums& other) {
    dy += other.dy;
    dy_xmu += other.dy_xmu;
  }
  C10_HOST_DEVICE void write(acc_t* sum_dy, acc_t* sum_dy_xmu, int64_t at) const {
    sum_dy[at] = dy;
    sum_dy_xmu[at] = dy_xmu;
  }
};

// How the grid covers [G, R, C, I]; planned on the host (plan_tiling), read by every kernel.
struct Tiling {
  int64_t rows = 0, channels = 0, inner = 1;
  bool along_channels = false;     // I == 1: vectors run along C
  int lanes = 1;                   // blockDim.x, threads along the vectorised axis; blockDim.y = kThreads / lanes
  int64_t rows_per_block = 0;      // grid.y splits R
  int64_t vectors_per_block = 1;   // plane tiling: grid.z splits a row's vectors
  int64_t grid_x = 0, grid_y = 0, grid_z = 0;
  int64_t splits = 1;              // blocks per (g, c): partial results of each
};


__device__ __forceinline__ int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

inline int power_of_two_at_least(int64_t n, int cap) {
  return static_cast<int>(std::clamp<int64_t>(c10::llvm::PowerOf2Ceil(std::max<int64_t>(n, 1)), 1, cap));
}

// Enough blocks to fill the card `kBlocksPerMultiprocessor` times over, none with less than
// kMinVectorsPerThread vectors per thread, within the grid's limits.
inline Tiling plan_tiling(const BatchNormLayout& layout, int vec, int64_t multiprocessors) {
  Tiling t;
  t.rows = layout.rows;
  t.channels = layout.channels;
  t.inner = layout.inner;
  t.along_channels = layout.inner == 1;
  const int64_t groups = layout.groups, target = std::max<int64_t>(1, multiprocessors) * kBlocksPerMultiprocessor;
  const int64_t rows = std::max<int64_t>(1, t.rows);
  if (!t.along_channels) {
    const int64_t vectors = t.inner / vec, pairs = groups * t.channels;
    t.lanes = power_of_two_at_least(vectors, kThreads);
    const int64_t enough = std::max<int64_t>(1, rows * vectors / (kThreads * kMinVectorsPerThread));
    const int64_t per_pair = std::clamp<int64_t>(ceil_div(target, pairs), 1, enough);
    // Whole rows first (long runs of loads), then the vectors of a row.
    int64_t split_rows = std::min(per_pair, rows);
    t.rows_per_block = std::max(ceil_div(rows, split_rows), ceil_div(rows, kMaxGridYZ));
    split_rows = ceil_div(rows, t.rows_per_block);
    int64_t split_vectors = std::clamp<int64_t>(ceil_div(per_pair, split_rows), 1, ceil_div(vectors, int64_t(t.lanes)));
    t.vectors_per_block = at::round_up(ceil_div(vectors, split_vectors), int64_t(t.lanes));
    t.vectors_per_block = std::max(t.vectors_per_block, ceil_div(vectors, kMaxGridYZ));
    split_vectors = ceil_div(vectors, t.vectors_per_block);
    t.grid_x = pairs, t.grid_y = split_rows, t.grid_z = split_vectors;
    t.splits = split_rows * split_vectors;
  } else {
    const int64_t vectors = t.channels / vec;
    t.lanes = power_of_two_at_least(vectors, 32);
    const int64_t tiles = ceil_div(vectors, int64_t(t.lanes)), rows_per_pass = kThreads / t.lanes;
    const int64_t enough = std::max<int64_t>(1, rows / (rows_per_pass * kMinVectorsPerThread));
    const int64_t per_group = std::clamp<int64_t>(ceil_div(target, tiles * groups), 1, enough);
    t.rows_per_block = std::max(ceil_div(rows, per_group), ceil_div(rows, kMaxGridYZ));
    t.grid_x = tiles, t.grid_y = ceil_div(rows, t.rows_per_block), t.grid_z = groups;
    t.splits = t.grid_y;
  }
  TORCH_CHECK_VALUE(t.grid_z <= kMaxGridYZ, "batch_norm: at most ", kMaxGridYZ, " statistics groups on CUDA, got ",
                    groups);
  TORCH_CHECK_VALUE(t.grid_x <= std::numeric_limits<int32_t>::max(), "batch_norm: too many channels for one launch");
  return t;
}

// What one thread visits: in rows row, row + blockDim.y, ... < row_end, the vectors vector,
// vector + vector_step, ... < vector_end; its values belong to group `group` and channels
// channel + k * channel_step (k < VEC).
struct ThreadSlice {
  int64_t group, channel, channel_step;
  bool active;
  int64_t base, row_stride;  // element offset of (group, row 0, channel, vector 0); between rows
  int64_t row, row_end, vector, vector_end, vector_step;
  int64_t split;  // which partial result of (group, channel) this block produces
};

// Reductions walk the grid backwards and element passes forwards, so that each pass starts on
// the data the pass before it touched last, which is still in L2 (blocks start roughly in
// blockIdx order). Reversing each coordinate reverses the whole order.
enum class Walk { forwards, backwards };

struct BlockIndex {
  int64_t x, y, z;
};

__device__ __forceinline__ BlockIndex block_index(Walk walk) {
  if (walk == Walk::forwards) return {blockIdx.x, blockIdx.y, blockIdx.z};
  return {gridDim.x - 1 - blockIdx.x, gridDim.y - 1 - blockIdx.y, gridDim.z - 1 - blockIdx.z};
}

template <int VEC>
__device__ __forceinline__ ThreadSlice slice_of(const Tiling& t, Walk walk) {
  const BlockIndex b = block_index(walk);
  ThreadSlice s;
  s.row = b.y * t.rows_per_block + threadIdx.y;
  s.row_end = smaller(t.rows, (b.y + 1) * t.rows_per_block);
  if (!t.along_channels) {
    s.group = b.x / t.channels, s.channel = b.x % t.channels, s.channel_step = 0;
    s.active = true;
    s.base = (s.group * t.rows * t.channels + s.channel) * t.inner, s.row_stride = t.channels * t.inner;
    s.vector = b.z * t.vectors_per_block + threadIdx.x, s.vector_step = blockDim.x;
    s.vector_end = smaller(t.inner / VEC, (b.z + 1) * t.vectors_per_block);
    s.split = b.y * int64_t(gridDim.z) + b.z;
  } else {
    s.group = b.z, s.channel = (b.x * blockDim.x + threadIdx.x) * VEC, s.channel_step = 1;
    s.active = s.channel < t.channels;  // VEC > 1 only when VEC divides C
    s.base = s.group * t.rows * t.channels + s.channel, s.row_stride = t.channels;
    s.vector = 0, s.vector_end = 1, s.vector_step = 1;
    s.split = b.y;
  }
  return s;
}

// Calls f(offset) for each vector of the thread's slice. Unrolled, so that several loads are in
// flight per thread (the kernels' pointers are __restrict__, so loads may pass stores): over the
// rows when the thread has one vector per row (always so along channels), else over a row's vectors.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_vector(const ThreadSlice& s, F&& f) {
  if (!s.active || s.vector >= s.vector_end) return;
  if (s.vector + s.vector_step >= s.vector_end) {
    const int64_t first = s.base + s.vector * VEC;
#pragma unroll 4
    for (int64_t r = s.row; r < s.row_end; r += blockDim.y) f(first + r * s.row_stride);
    return;
  }
  for (int64_t r = s.row; r < s.row_end; r += blockDim.y) {
    const int64_t row = s.base + r * s.row_stride;
#pragma unroll 4
    for (int64_t v = s.vector; v < s.vector_end; v += s.vector_step) f(row + v * VEC);
  }
}

// Tree merge over the block's rows of `shared` (entry (row, j) at row * row_size + j; this
// thread owns entries first .. first + count - 1 of its row); the result lands in row 0.
// `rows` is a power of two. Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ void merge_rows(T* shared, int row, int rows, int row_size, int first, int count) {
  __syncthreads();
  for (int step = rows / 2; step > 0; step /= 2) {
    if (row < step) {
      for (int j = first; j < first + count; ++j) shared[row * row_size + j].merge(shared[(row + step) * row_size + j]);
    }
    __syncthreads();
  }
}

// Merges each thread's VEC per-slot results over the block and writes the block's partial result
// of each (group, channel) to partial[(group * C + channel) * splits + split].
template <typename T, int VEC>
__device__ __forceinline__ void write_partials(T (&slots)[VEC], const Tiling& t, const ThreadSlice& s, T* partial) {
  alignas(T) __shared__ unsigned char storage[sizeof(T) * kThreads * VEC];
  T* shared = reinterpret_cast<T*>(storage);
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  if (!t.along_channels) {  // every slot is the block's one channel
    for (int k = 1; k < VEC; ++k) slots[0].merge(slots[k]);
    shared[thread] = slots[0];
    merge_rows(shared, thread, kThreads, 1, 0, 1);
    if (thread == 0) partial[(s.group * t.channels + s.channel) * t.splits + s.split] = shared[0];
  } else {  // merge over threadIdx.y, per lane and slot
    for (int k = 0; k < VEC; ++k) shared[thread * VEC + k] = slots[k];
    merge_rows(shared, threadIdx.y, blockDim.y, blockDim.x * VEC, threadIdx.x * VEC, VEC);
    if (threadIdx.y == 0 && s.active) {
      for (int k = 0; k < VEC; ++k) {
        partial[(s.group * t.channels + s.channel + k) * t.splits + s.split] = shared[threadIdx.x * VEC + k];
      }
    }
  }
}

// Stage 1 of batch_norm_stats: count, mean and m2 per slot (Welford; the slots share the count,
// so one division serves a whole vector).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) moments_kernel(const scalar_t* __restrict__ x, Tiling t,
                                                           Moments<acc_t>* __restrict__ partial) {
  const ThreadSlice s = slice_of<VEC>(t, Walk::backwards);
  acc_t n = 0, mean[VEC] = {}, m2[VEC] = {};
  for_each_vector<VEC>(s, [&](int64_t at) {
    const Pack<scalar_t, VEC> v = load<VEC>(x + at);
    n += 1;
    const acc_t inverse_n = acc_t(1) / n;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t value = static_cast<acc_t>(v.value[k]), delta = value - mean[k];
      mean[k] += delta * inverse_n;
      m2[k] += delta * (value - mean[k]);
    }
  });
  Moments<acc_t> slots[VEC];
  // n counts this thread's vectors: far below 2^24, so exact in acc_t
  for (int k = 0; k < VEC; ++k) slots[k] = Moments<acc_t>{static_cast<int64_t>(n), mean[k], m2[k]};
  write_partials(slots, t, s, partial);
}

// Stage 1 of batch_norm_backward_reduce.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) sums_kernel(const scalar_t* __restrict__ dy,
                                                        const scalar_t* __restrict__ x, const acc_t* mean,
                                                        int64_t mean_stride, Tiling t,
                                                        Sums<acc_t>* __restrict__ partial) {
  const ThreadSlice s = slice_of<VEC>(t, Walk::backwards);
  Sums<acc_t> slots[VEC];
  acc_t mu[VEC];
  for (int k = 0; k < VEC; ++k) mu[k] = s.active ? mean[s.group * mean_stride + s.channel + k * s.channel_step] : acc_t(0);
  for_each_vector<VEC>(s, [&](int64_t at) {
    const Pack<scalar_t, VEC> d = load<VEC>(dy + at), v = load<VEC>(x + at);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t g = static_cast<acc_t>(d.value[k]);
      slots[k].dy += g;
      slots[k].dy_xmu += g * (static_cast<acc_t>(v.value[k]) - mu[k]);
    }
  });
  write_partials(slots, t, s, partial);
}

// Stage 2: merges each (group, channel)'s partial results in a fixed order. A block serves
// kThreads / threads_per_pair pairs; a pair's threads (rows) take every threads_per_pair-th split.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) merge_partials_kernel(const T* partial, int64_t pairs, int64_t splits,
                                                                  int threads_per_pair, acc_t* first, acc_t* second) {
  alignas(T) __shared__ unsigned char storage[sizeof(T) * kThreads];
  T* shared = reinterpret_cast<T*>(storage);
  const int pairs_per_block = kThreads / threads_per_pair;
  const int slot = threadIdx.x % pairs_per_block, row = threadIdx.x / pairs_per_block;
  const int64_t pair = int64_t(blockIdx.x) * pairs_per_block + slot;
  T total{};
  if (pair < pairs) {
    for (int64_t k = row; k < splits; k += threads_per_pair) total.merge(partial[pair * splits + k]);
  }
  shared[threadIdx.x] = total;
  merge_rows(shared, row, threads_per_pair, pairs_per_block, slot, 1);
  if (row == 0 && pair < pairs) shared[slot].write(first, second, pair);
}

// Per-(group, channel) values and their row strides between groups (C, or 0 when shared), and the
// per-group scale (TEBN's) or nullptr.
template <typename acc_t>
struct GroupValues {
  const acc_t *mean, *var, *weight, *bias, *scale;
  int64_t stat_stride, weight_stride, bias_stride;
};

// y = ((x - mean) * invstd * w + b) * scale[g]
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) elemt_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Tiling t,
                                                         GroupValues<acc_t> p, acc_t eps) {
  const ThreadSlice s = slice_of<VEC>(t, Walk::forwards);
  if (!s.active) return;
  acc_t mu[VEC], scale[VEC], shift[VEC];
  const acc_t step = p.scale ? p.scale[s.group] : acc_t(1);
  for (int k = 0; k < VEC; ++k) {
    const int64_t c = s.channel + k * s.channel_step, gc = s.group * p.stat_stride + c;
    mu[k] = p.mean[gc];
    scale[k] = step * (p.weight ? p.weight[s.group * p.weight_stride + c] : acc_t(1)) * inverse_sqrt(p.var[gc] + eps);
    shift[k] = step * (p.bias ? p.bias[s.group * p.bias_stride + c] : acc_t(0));
  }
  for_each_vector<VEC>(s, [&](int64_t at) {
    const Pack<scalar_t, VEC> v = load<VEC>(x + at);
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out.value[k] = static_cast<scalar_t>((static_cast<acc_t>(v.value[k]) - mu[k]) * scale[k] + shift[k]);
    }
    store<VEC>(y + at, out);
  });
}

// dx = (dy * scale[g] - sum_dy / n) * invstd * w - (x - mean) * invstd^3 * w * sum_dy_xmu / n
// (sum_dy, sum_dy_xmu: of dy * scale, with the statistics' stride)
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) backward_elemt_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, Tiling t,
    GroupValues<acc_t> p, const acc_t* sum_dy, const acc_t* sum_dy_xmu, acc_t eps, acc_t count) {
  const ThreadSlice s = slice_of<VEC>(t, Walk::forwards);
  if (!s.active) return;
  acc_t mu[VEC], shift[VEC], scale[VEC], xmu_scale[VEC];
  const acc_t step = p.scale ? p.scale[s.group] : acc_t(1);
  for (int k = 0; k < VEC; ++k) {
    const int64_t c = s.channel + k * s.channel_step, gc = s.group * p.stat_stride + c;
    const acc_t invstd = inverse_sqrt(p.var[gc] + eps);
    const acc_t w = invstd * (p.weight ? p.weight[s.group * p.weight_stride + c] : acc_t(1));
    mu[k] = p.mean[gc];
    scale[k] = w * step;
    shift[k] = w * sum_dy[gc] / count;
    xmu_scale[k] = w * invstd * invstd * sum_dy_xmu[gc] / count;
  }
  for_each_vector<VEC>(s, [&](int64_t at) {
    const Pack<scalar_t, VEC> d = load<VEC>(dy + at), v = load<VEC>(x + at);
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t g = static_cast<acc_t>(d.value[k]), xmu = static_cast<acc_t>(v.value[k]) - mu[k];
      out.value[k] = static_cast<scalar_t>(g * scale[k] - shift[k] - xmu * xmu_scale[k]);
    }
    store<VEC>(dx + at, out);
  });
}

// Running statistics, group by group in time order, and num_batches_tracked, on the device (one
// block: the counter is read by every channel before it is advanced).
// Running statistics [C] are updated group by group; [G, C] ones row by row, one batch counted.
template <typename scalar_t, typename stat_t>
__global__ void __launch_bounds__(kThreads) update_stats_kernel(
    const stat_t* mean, const stat_t* var, int64_t groups, int64_t channels, double count, scalar_t* running_mean,
    scalar_t* running_var, bool rows, int64_t* batches, double momentum, bool cumulative) {
  const int64_t before = batches ? *batches : 0;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    for (int64_t g = 0; g < groups; ++g) {
      const double factor = cumulative ? 1.0 / static_cast<double>(before + (rows ? 1 : g + 1)) : momentum;
      const int64_t at = (rows ? g * channels : 0) + c;
      const double m = static_cast<double>(running_mean[at]), v = static_cast<double>(running_var[at]);
      running_mean[at] = static_cast<scalar_t>((1 - factor) * m + factor * static_cast<double>(mean[g * channels + c]));
      running_var[at] = static_cast<scalar_t>((1 - factor) * v + factor * static_cast<double>(var[g * channels + c]) * count / (count - 1));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && batches) *batches = before + (rows ? 1 : groups);
}

// ---- Launch sequences: shared by the CUDA ops and the CPU emulation. `launch(kernel, grid,
// block, args...)` runs a kernel on the current stream; `launch.multiprocessors()` sizes grids.

using detail::accumulation_typed;
using detail::data_or_null;
using detail::group_stride;

template <typename acc_t>
GroupValues<acc_t> group_values(const at::Tensor& m, const at::Tensor& v, const at::Tensor& w, const at::Tensor& b,
                                const at::Tensor& scale, int64_t channels) {
  return {m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), data_or_null<acc_t>(w), data_or_null<acc_t>(b),
          data_or_null<acc_t>(scale), group_stride(m, channels), group_stride(w, channels), group_stride(b, channels)};
}

// Calls f(std::integral_constant<int, VEC>) with 16-byte vectors when the vectorised axis and
// every tensor's start allow them, else with single values.
template <typename scalar_t, typename F>
void with_vector_width(const BatchNormLayout& layout, std::initializer_list<const at::Tensor*> tensors, F&& f) {
  constexpr int wide = std::max<int>(1, 16 / sizeof(scalar_t));
  const int64_t axis = layout.inner == 1 ? layout.channels : layout.inner;
  bool aligned = axis % wide == 0;
  for (const at::Tensor* t : tensors) aligned = aligned && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0;
  if (aligned) {
    f(std::integral_constant<int, wide>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

inline dim3 grid_of(const Tiling& t) {
  return dim3(static_cast<unsigned>(t.grid_x), static_cast<unsigned>(t.grid_y), static_cast<unsigned>(t.grid_z));
}

inline dim3 block_of(const Tiling& t) { return dim3(t.lanes, kThreads / t.lanes); }

// Stage 2 of a reduction: a thread per split, up to a block per pair.
template <typename T, typename acc_t, typename Launch>
void launch_merge(const T* partial, int64_t pairs, int64_t splits, acc_t* first, acc_t* second, const Launch& launch) {
  const int threads_per_pair = power_of_two_at_least(splits, kThreads), pairs_per_block = kThreads / threads_per_pair;
  launch(merge_partials_kernel<T, acc_t>, dim3(static_cast<unsigned>(ceil_div(pairs, int64_t(pairs_per_block)))),
         dim3(kThreads), partial, pairs, splits, threads_per_pair, first, second);
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> launch_stats(const at::Tensor& input, int64_t groups, const Launch& launch) {
  detail::check_stats_arguments(input, groups);
  auto [x, layout] = detail::batch_norm_layout(input, groups);
  const auto acc = at::toOpMathType(input.scalar_type());
  const int64_t pairs = groups * layout.channels;
  at::Tensor mean = at::empty({groups, layout.channels}, input.options().dtype(acc));
  at::Tensor var = at::empty({groups, layout.channels}, input.options().dtype(acc));
  if (pairs == 0) return {mean, var};
  if (x.numel() == 0) return {mean.fill_(NAN), var.fill_(NAN)};  // no values: no statistics
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(layout, {&x}, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const Tiling t = plan_tiling(layout, VEC, launch.multiprocessors());
      at::Tensor partial =
          at::empty({pairs * t.splits * static_cast<int64_t>(sizeof(Moments<acc_t>))}, mean.options().dtype(at::kByte));
      auto* partial_moments = reinterpret_cast<Moments<acc_t>*>(partial.data_ptr<uint8_t>());
      launch(moments_kernel<scalar_t, acc_t, VEC>, grid_of(t), block_of(t), x.const_data_ptr<scalar_t>(), t,
             partial_moments);
      launch_merge(static_cast<const Moments<acc_t>*>(partial_moments), pairs, t.splits, mean.data_ptr<acc_t>(),
                   var.data_ptr<acc_t>(), launch);
    });
  });
  return {mean, var};
}

template <typename Launch>
at::Tensor launch_elemt(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                        int64_t groups, const std::optional<at::Tensor>& scale, const Launch& launch) {
  detail::check_elemt_arguments(input, mean, var, weight, bias, eps, groups, scale);
  auto [x, layout] = detail::batch_norm_layout(input, groups);
  const at::Tensor m = accumulation_typed(mean, input), v = accumulation_typed(var, input);
  const at::Tensor w = accumulation_typed(weight, input), b = accumulation_typed(bias, input);
  const at::Tensor s = accumulation_typed(scale, input);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(layout, {&x, &out}, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const Tiling t = plan_tiling(layout, VEC, launch.multiprocessors());
      launch(elemt_kernel<scalar_t, acc_t, VEC>, grid_of(t), block_of(t), x.const_data_ptr<scalar_t>(),
             out.data_ptr<scalar_t>(), t, group_values<acc_t>(m, v, w, b, s, layout.channels),
             static_cast<acc_t>(eps));
    });
  });
  return out;
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> launch_backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                                          const at::Tensor& mean, int64_t groups,
                                                          const Launch& launch) {
  detail::check_backward_reduce_arguments(grad_output, input, mean, groups);
  auto [x, layout] = detail::batch_norm_layout(input, groups);
  const at::Tensor dy = detail::like_layout(grad_output, layout), mu = accumulation_typed(mean, input);
  const int64_t pairs = groups * layout.channels;
  at::Tensor sum_dy = at::empty({groups, layout.channels}, mu.options());
  at::Tensor sum_dy_xmu = at::empty({groups, layout.channels}, mu.options());
  if (pairs == 0) return {sum_dy, sum_dy_xmu};
  if (x.numel() == 0) return {sum_dy.zero_(), sum_dy_xmu.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(layout, {&x, &dy}, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const Tiling t = plan_tiling(layout, VEC, launch.multiprocessors());
      at::Tensor partial = at::empty({pairs, t.splits, 2}, mu.options());
      auto* partial_sums = reinterpret_cast<Sums<acc_t>*>(partial.data_ptr<acc_t>());
      launch(sums_kernel<scalar_t, acc_t, VEC>, grid_of(t), block_of(t), dy.const_data_ptr<scalar_t>(),
             x.const_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(), group_stride(mu, layout.channels), t,
             partial_sums);
      launch_merge(static_cast<const Sums<acc_t>*>(partial_sums), pairs, t.splits, sum_dy.data_ptr<acc_t>(),
                   sum_dy_xmu.data_ptr<acc_t>(), launch);
    });
  });
  return {sum_dy, sum_dy_xmu};
}

template <typename Launch>
at::Tensor launch_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps, int64_t count,
                                 int64_t groups, const std::optional<at::Tensor>& scale, const Launch& launch) {
  detail::check_backward_elemt_arguments(
      grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, eps, count, groups, scale);
  auto [x, layout] = detail::batch_norm_layout(input, groups);
  const at::Tensor dy = detail::like_layout(grad_output, layout);
  const at::Tensor m = accumulation_typed(mean, input), v = accumulation_typed(var, input);
  const at::Tensor w = accumulation_typed(weight, input), s = accumulation_typed(scale, input);
  const at::Tensor sd = accumulation_typed(sum_dy, input), sdx = accumulation_typed(sum_dy_xmu, input);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(layout, {&x, &dy, &out}, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const Tiling t = plan_tiling(layout, VEC, launch.multiprocessors());
      launch(backward_elemt_kernel<scalar_t, acc_t, VEC>, grid_of(t), block_of(t),
             dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t,
             group_values<acc_t>(m, v, w, at::Tensor(), s, layout.channels),
             sd.const_data_ptr<acc_t>(), sdx.const_data_ptr<acc_t>(), static_cast<acc_t>(eps),
             static_cast<acc_t>(count));
    });
  });
  return out;
}

template <typename Launch>
void launch_update_stats(const at::Tensor& mean, const at::Tensor& var, int64_t count,
                         const at::Tensor& running_mean, const at::Tensor& running_var,
                         const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
                         const Launch& launch) {
  detail::check_update_stats_arguments(mean, var, count, running_mean, running_var, num_batches_tracked);
  const int64_t channels = mean.size(1);
  const bool rows = running_mean.dim() == 2;
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (count == 0) {  // an empty batch is counted, as torch.nn counts it, and leaves the statistics
    if (tracked) num_batches_tracked->add_(rows ? 1 : mean.size(0));
    return;
  }
  // float statistics stay float (no cast kernels); the update itself runs in double
  const auto stat_type = mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor m = detail::dense(detail::cast(mean, stat_type)), v = detail::dense(detail::cast(var, stat_type));
  int64_t* batches = tracked ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "batch_norm_update_stats", [&] {
    const auto run = [&](auto stat) {
      using stat_t = decltype(stat);
      launch(update_stats_kernel<scalar_t, stat_t>, dim3(1), dim3(kThreads), m.const_data_ptr<stat_t>(),
             v.const_data_ptr<stat_t>(), mean.size(0), channels, static_cast<double>(count),
             running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(), rows, batches, momentum.value_or(0.0),
             !momentum.has_value() && tracked);
    };
    stat_type == at::kDouble ? run(double{}) : run(float{});
  });
}

}  // namespace matterhorn::ops::cuda
