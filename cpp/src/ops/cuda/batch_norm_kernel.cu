// CUDA kernels of the BatchNorm building blocks (see ops/batch_norm.h), beside the CPU ones in
// ops/cpu/batch_norm_kernel.cpp. First, correct versions: two-stage reductions (partial moments or
// sums per slice of a (group, channel), merged in order by a second kernel), element kernels with
// the per-channel constants computed inline, the running-statistics update on the device (no host
// synchronisation). Not yet tuned for bandwidth (no vectorised loads; channels_last reductions
// read with a stride): that is the CUDA issue's work, to be measured on an H100/H200.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/batch_norm.h"

namespace {

using matterhorn::ops::detail::BatchNormLayout;
using matterhorn::ops::detail::like_layout;
using matterhorn::ops::detail::Moments;
using matterhorn::ops::detail::batch_norm_layout;
using matterhorn::ops::detail::cast;
using matterhorn::ops::detail::channels_innermost;
using matterhorn::ops::detail::check_batch_norm_block;
using matterhorn::ops::detail::dense;

constexpr int kThreads = 256;
constexpr int64_t kMaxSplits = 64;  // slices per (group, channel) in the first reduction stage

// Where the i-th value of (group g, channel c) lies in memory.
struct Walk {
  int64_t channels, rows, inner;
  bool channels_last;
  __device__ int64_t offset(int64_t g, int64_t c, int64_t i) const {
    return channels_last ? (g * rows + i) * channels + c
                         : ((g * rows + i / inner) * channels + c) * inner + i % inner;
  }
  __device__ int64_t channel_of(int64_t flat) const {  // channel of the flat element index
    return channels_last ? flat % channels : (flat / inner) % channels;
  }
  __device__ int64_t group_of(int64_t flat) const { return flat / (rows * inner * channels); }
};

Walk walk_of(const BatchNormLayout& l) { return {l.channels, l.rows, l.inner, l.channels_last}; }

// Stage 1: block (gc, split) -> the moments of its slice. Welford per thread, then a tree merge.
template <typename scalar_t, typename acc_t>
__global__ void partial_moments(const scalar_t* x, Walk walk, int64_t count, acc_t* part) {
  const int64_t gc = blockIdx.x, g = gc / walk.channels, c = gc % walk.channels;
  Moments<acc_t> m{0, 0, 0};
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(blockDim.x) * gridDim.y) {
    const acc_t value = static_cast<acc_t>(x[walk.offset(g, c, i)]);
    m.merge(1, value, 0);
  }
  __shared__ acc_t shared[3][kThreads];
  shared[0][threadIdx.x] = m.count, shared[1][threadIdx.x] = m.mean, shared[2][threadIdx.x] = m.m2;
  __syncthreads();
  for (int step = blockDim.x / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) {
      Moments<acc_t> a{shared[0][threadIdx.x], shared[1][threadIdx.x], shared[2][threadIdx.x]};
      a.merge(shared[0][threadIdx.x + step], shared[1][threadIdx.x + step], shared[2][threadIdx.x + step]);
      shared[0][threadIdx.x] = a.count, shared[1][threadIdx.x] = a.mean, shared[2][threadIdx.x] = a.m2;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    acc_t* out = part + (gc * gridDim.y + blockIdx.y) * 3;
    out[0] = shared[0][0], out[1] = shared[1][0], out[2] = shared[2][0];
  }
}

// Stage 2: one thread per (group, channel) merges its slices in order.
template <typename acc_t>
__global__ void merge_moments(const acc_t* part, int64_t splits, int64_t pairs, acc_t* mean, acc_t* var) {
  const int64_t gc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (gc >= pairs) return;
  Moments<acc_t> m{0, 0, 0};
  for (int64_t k = 0; k < splits; ++k) {
    const acc_t* p = part + (gc * splits + k) * 3;
    m.merge(p[0], p[1], p[2]);
  }
  mean[gc] = m.mean;
  var[gc] = m.count > 0 ? m.m2 / m.count : acc_t(0);
}

// sum(dy) and sum(dy * (x - mean)) per slice, then per (group, channel).
template <typename scalar_t, typename acc_t>
__global__ void partial_sums(const scalar_t* dy, const scalar_t* x, const acc_t* mean, Walk walk, int64_t count,
                             acc_t* part) {
  const int64_t gc = blockIdx.x, g = gc / walk.channels, c = gc % walk.channels;
  const acc_t mu = mean[gc];
  acc_t sum_dy = 0, sum_dy_xmu = 0;
  for (int64_t i = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(blockDim.x) * gridDim.y) {
    const int64_t at = walk.offset(g, c, i);
    const acc_t d = static_cast<acc_t>(dy[at]);
    sum_dy += d;
    sum_dy_xmu += d * (static_cast<acc_t>(x[at]) - mu);
  }
  __shared__ acc_t shared[2][kThreads];
  shared[0][threadIdx.x] = sum_dy, shared[1][threadIdx.x] = sum_dy_xmu;
  __syncthreads();
  for (int step = blockDim.x / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) {
      shared[0][threadIdx.x] += shared[0][threadIdx.x + step];
      shared[1][threadIdx.x] += shared[1][threadIdx.x + step];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    acc_t* out = part + (gc * gridDim.y + blockIdx.y) * 2;
    out[0] = shared[0][0], out[1] = shared[1][0];
  }
}

template <typename acc_t>
__global__ void merge_sums(const acc_t* part, int64_t splits, int64_t pairs, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  const int64_t gc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (gc >= pairs) return;
  acc_t a = 0, b = 0;
  for (int64_t k = 0; k < splits; ++k) {
    a += part[(gc * splits + k) * 2];
    b += part[(gc * splits + k) * 2 + 1];
  }
  sum_dy[gc] = a, sum_dy_xmu[gc] = b;
}

// y = (x - mean) / sqrt(var + eps) * w + b
template <typename scalar_t, typename acc_t>
__global__ void elemt(const scalar_t* x, scalar_t* y, int64_t n, Walk walk, const acc_t* mean, const acc_t* var,
                      const acc_t* weight, const acc_t* bias, acc_t eps) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = walk.channel_of(i), gc = walk.group_of(i) * walk.channels + c;
    const acc_t scale = (weight ? weight[c] : acc_t(1)) * rsqrt(var[gc] + eps);
    y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - mean[gc]) * scale + (bias ? bias[c] : acc_t(0)));
  }
}

// dx = (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * invstd * w
template <typename scalar_t, typename acc_t>
__global__ void backward_elemt(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, Walk walk,
                               const acc_t* mean, const acc_t* var, const acc_t* weight, const acc_t* sum_dy,
                               const acc_t* sum_dy_xmu, acc_t eps, acc_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = walk.channel_of(i), gc = walk.group_of(i) * walk.channels + c;
    const acc_t invstd = rsqrt(var[gc] + eps);
    const acc_t xmu = static_cast<acc_t>(x[i]) - mean[gc];
    const acc_t value = static_cast<acc_t>(dy[i]) - sum_dy[gc] / count - xmu * invstd * invstd * sum_dy_xmu[gc] / count;
    dx[i] = static_cast<scalar_t>(value * invstd * (weight ? weight[c] : acc_t(1)));
  }
}

// Running statistics, once per group in order, on the device.
template <typename scalar_t>
__global__ void update_stats(const double* mean, const double* var, int64_t groups, int64_t channels, double count,
                             scalar_t* running_mean, scalar_t* running_var, int64_t* batches, double momentum,
                             bool cumulative) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= channels) return;
  const int64_t before = batches ? *batches : 0;
  for (int64_t g = 0; g < groups; ++g) {
    const double factor = cumulative ? 1.0 / static_cast<double>(before + g + 1) : momentum;
    running_mean[c] = static_cast<scalar_t>((1 - factor) * static_cast<double>(running_mean[c]) + factor * mean[g * channels + c]);
    running_var[c] = static_cast<scalar_t>((1 - factor) * static_cast<double>(running_var[c]) +
                                           factor * var[g * channels + c] * count / (count - 1));
  }
}

__global__ void add_batches(int64_t* batches, int64_t groups) { *batches += groups; }

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)); }

int64_t splits_for(int64_t count) { return std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, count / (kThreads * 16))); }

at::Tensor per_channel(const std::optional<at::Tensor>& t, const at::Tensor& input) {
  return t.has_value() && t->defined() ? dense(cast(*t, at::toOpMathType(input.scalar_type()))) : at::Tensor();
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& input, int64_t groups) {
  check_batch_norm_block("batch_norm_stats", input, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor x;
  BatchNormLayout layout;
  std::tie(x, layout) = batch_norm_layout(input, groups);
  const auto acc = at::toOpMathType(input.scalar_type());
  const int64_t pairs = groups * layout.channels, splits = splits_for(layout.count());
  at::Tensor mean = at::empty({groups, layout.channels}, input.options().dtype(acc));
  at::Tensor var = at::empty({groups, layout.channels}, input.options().dtype(acc));
  at::Tensor part = at::empty({pairs, splits, 3}, input.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (pairs > 0) {
      partial_moments<scalar_t, acc_t><<<dim3(pairs, splits), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), walk_of(layout), layout.count(), part.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_moments<acc_t><<<blocks_for(pairs), kThreads, 0, stream>>>(
          part.const_data_ptr<acc_t>(), splits, pairs, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {mean, var};
}

at::Tensor elemt_cuda(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t groups) {
  check_batch_norm_block("batch_norm_elemt", input, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor x;
  BatchNormLayout layout;
  std::tie(x, layout) = batch_norm_layout(input, groups);
  const at::Tensor m = per_channel(mean, input), v = per_channel(var, input);
  const at::Tensor w = per_channel(weight, input), b = per_channel(bias, input);
  TORCH_CHECK_VALUE(m.numel() == groups * layout.channels && v.numel() == m.numel(),
                    "batch_norm_elemt: mean and var must hold groups x channels values");
  at::Tensor out = at::empty_like(x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (x.numel() > 0) {
      elemt<scalar_t, acc_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), walk_of(layout),
          m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), data_or_null<acc_t>(w), data_or_null<acc_t>(b),
          static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups) {
  check_batch_norm_block("batch_norm_backward_reduce", input, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor x;
  BatchNormLayout layout;
  std::tie(x, layout) = batch_norm_layout(input, groups);
  const at::Tensor dy = like_layout(grad_output, layout), mu = per_channel(mean, input);
  const int64_t pairs = groups * layout.channels, splits = splits_for(layout.count());
  at::Tensor sum_dy = at::empty({groups, layout.channels}, mu.options());
  at::Tensor sum_dy_xmu = at::empty({groups, layout.channels}, mu.options());
  at::Tensor part = at::empty({pairs, splits, 2}, mu.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (pairs > 0) {
      partial_sums<scalar_t, acc_t><<<dim3(pairs, splits), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(), walk_of(layout),
          layout.count(), part.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_sums<acc_t><<<blocks_for(pairs), kThreads, 0, stream>>>(
          part.const_data_ptr<acc_t>(), splits, pairs, sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elemt_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    c10::SymInt count, int64_t groups) {
  check_batch_norm_block("batch_norm_backward_elemt", input, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor x;
  BatchNormLayout layout;
  std::tie(x, layout) = batch_norm_layout(input, groups);
  const at::Tensor dy = like_layout(grad_output, layout);
  const at::Tensor m = per_channel(mean, input), v = per_channel(var, input), w = per_channel(weight, input);
  const at::Tensor sd = per_channel(sum_dy, input), sdx = per_channel(sum_dy_xmu, input);
  at::Tensor out = at::empty_like(x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (x.numel() > 0) {
      backward_elemt<scalar_t, acc_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(),
          walk_of(layout), m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), data_or_null<acc_t>(w),
          sd.const_data_ptr<acc_t>(), sdx.const_data_ptr<acc_t>(), static_cast<acc_t>(eps),
          static_cast<acc_t>(count.expect_int()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

void update_stats_cuda(
    const at::Tensor& mean, const at::Tensor& var, c10::SymInt count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum) {
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const int64_t C = running_mean.numel();
  TORCH_CHECK_VALUE(mean.dim() == 2 && mean.size(1) == C && var.sizes() == mean.sizes(),
                    "batch_norm_update_stats: expected mean and var [G, C], got ", mean.sizes(), " and ", var.sizes());
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  const at::Tensor m = dense(cast(mean, at::kDouble)), v = dense(cast(var, at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t* batches = tracked ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "batch_norm_update_stats", [&] {
    update_stats<scalar_t><<<blocks_for(C), kThreads, 0, stream>>>(
        m.const_data_ptr<double>(), v.const_data_ptr<double>(), mean.size(0), C, static_cast<double>(count.expect_int()),
        running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(), batches, momentum.value_or(0.0),
        !momentum.has_value() && tracked);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (tracked) {  // after the update, which read the count before it
    add_batches<<<1, 1, 0, stream>>>(batches, mean.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, CUDA, m) {
  m.impl("batch_norm_stats", &stats_cuda);
  m.impl("batch_norm_elemt", &elemt_cuda);
  m.impl("batch_norm_backward_reduce", &backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &backward_elemt_cuda);
  m.impl("batch_norm_update_stats", &update_stats_cuda);
}
