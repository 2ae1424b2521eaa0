// CPU kernels of the BatchNorm building blocks (see ops/batch_norm.h). Statistics in one pass over
// the input (moments per row, or per cached chunk of rows for channels_last, merged with Chan's
// formula), float32 accumulation for float16/bfloat16, no transposes or layout copies for
// contiguous or channels_last inputs, parallel over (group, channel) or over rows.
// Compiled once per CPU capability; the ops call the build cpu/dispatch.cpp chooses.
#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "ops/batch_norm.h"
#include "ops/cpu/dispatch.h"
#include "ops/cpu/vectorized.h"

namespace {

using matterhorn::ops::detail::BatchNormLayout;
using matterhorn::ops::detail::like_layout;
using matterhorn::ops::detail::Moments;
using matterhorn::ops::detail::cast;
using matterhorn::ops::detail::channels_innermost;
using matterhorn::ops::detail::dense;
using matterhorn::ops::detail::accumulation_typed;
using matterhorn::ops::detail::data_or_null;
using matterhorn::ops::detail::group_stride;
using matterhorn::ops::detail::batch_norm_layout;
using matterhorn::ops::detail::check_backward_elemt_arguments;
using matterhorn::ops::detail::check_backward_reduce_arguments;
using matterhorn::ops::detail::check_elemt_arguments;
using matterhorn::ops::detail::check_stats_arguments;
using matterhorn::ops::detail::check_update_stats_arguments;
using matterhorn::ops::cpu::Vec;
using matterhorn::ops::cpu::for_each_lane;
using matterhorn::ops::cpu::kLanes;
using matterhorn::ops::cpu::kWidth;
using matterhorn::ops::cpu::load_as;
using matterhorn::ops::cpu::mean_and_m2;
using matterhorn::ops::cpu::row_sums;
using matterhorn::ops::cpu::store_as;

constexpr int64_t kRowsPerChunk = 256;     // channels_last reductions: rows per partial result
constexpr int64_t kElementsPerTask = 32768;  // element-wise kernels: smallest parallel task
constexpr int64_t kChannelBlock = 32;        // channels_last reductions: channels whose sums stay in registers

// channels_last reductions walk rows of C values. Per block of channels, the per-channel sums are
// local arrays the compiler keeps in registers: accumulating into memory across a whole row would
// cost every element a load and a store more than the NCHW walk does. Calls
// f(c0, count, T{}) for the blocks: whole blocks as `count` (compile-time) vectors, T = Vec<acc_t>;
// the last, shorter block value by value, T = acc_t.
template <typename acc_t, typename F>
void for_channel_blocks(int64_t C, F&& f) {
  constexpr int64_t kVectors = kChannelBlock / kLanes<acc_t>;
  int64_t c0 = 0;
  for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) f(c0, std::integral_constant<int64_t, kVectors>{}, Vec<acc_t>{});
  if (c0 < C) f(c0, C - c0, acc_t{});
}

int64_t chunks_of(int64_t rows) { return (rows + kRowsPerChunk - 1) / kRowsPerChunk; }

// Rows are merged in double with an exact count: in float, millions of merges drift and a count
// above 2^24 stops growing (statistics 10% off at 2^25 values per channel).
template <typename acc_t>
void write_moments(const Moments<double>& moments, acc_t* mean, acc_t* var, int64_t at) {
  double m, v;
  moments.write(&m, &v, 0);
  mean[at] = static_cast<acc_t>(m);
  var[at] = static_cast<acc_t>(v);
}

template <typename scalar_t, typename acc_t>
void stats_kernel(const scalar_t* x, acc_t* mean, acc_t* var, const BatchNormLayout& l) {
  const int64_t C = l.channels, R = l.rows, S = l.inner;
  if (!l.channels_last) {  // [G, M, C, S]: each (group, channel) reads M contiguous rows of S
    at::parallel_for(0, l.groups * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t gc = begin; gc < end; ++gc) {
        const int64_t g = gc / C, c = gc % C;
        Moments<double> moments;
        for (int64_t m = 0; m < R; ++m) {
          const auto [row_mean, m2] = mean_and_m2<acc_t>(x + ((g * R + m) * C + c) * S, S);
          moments.merge(S, row_mean, m2);
        }
        write_moments(moments, mean, var, gc);
      }
    });
    return;
  }
  // [G, R, C]: per chunk of rows (small enough to stay in cache), the mean, then the squared
  // deviations from it: two passes over the chunk, one over memory, vectorised across channels.
  // Chunks are merged in order.
  const int64_t chunks = chunks_of(R);
  std::vector<acc_t> chunk_mean(l.groups * chunks * C, 0), chunk_m2(l.groups * chunks * C, 0);
  at::parallel_for(0, l.groups * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gk = begin; gk < end; ++gk) {
      const int64_t g = gk / chunks, first = (gk % chunks) * kRowsPerChunk;
      const int64_t last = std::min(R, first + kRowsPerChunk);
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(last - first);
      for_channel_blocks<acc_t>(C, [&](int64_t c0, auto count, auto lanes) {
        using T = decltype(lanes);
        constexpr int64_t W = kWidth<T>;
        T cm[kChannelBlock / W] = {}, cm2[kChannelBlock / W] = {};
        for (int64_t r = first; r < last; ++r) {
          const scalar_t* row = x + (g * R + r) * C + c0;
          for (int64_t k = 0; k < count; ++k) cm[k] += load_as<T>(row + k * W);
        }
        for (int64_t k = 0; k < count; ++k) cm[k] *= inv_n;
        for (int64_t r = first; r < last; ++r) {
          const scalar_t* row = x + (g * R + r) * C + c0;
          for (int64_t k = 0; k < count; ++k) {
            const T d = load_as<T>(row + k * W) - cm[k];
            cm2[k] += d * d;
          }
        }
        for (int64_t k = 0; k < count; ++k) {
          store_as(chunk_mean.data() + gk * C + c0 + k * W, cm[k]);
          store_as(chunk_m2.data() + gk * C + c0 + k * W, cm2[k]);
        }
      });
    }
  });
  at::parallel_for(0, l.groups * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gc = begin; gc < end; ++gc) {
      const int64_t g = gc / C, c = gc % C;
      Moments<double> moments;
      for (int64_t k = 0; k < chunks; ++k) {
        const int64_t n = std::min(R, (k + 1) * kRowsPerChunk) - k * kRowsPerChunk;
        moments.merge(n, chunk_mean[(g * chunks + k) * C + c], chunk_m2[(g * chunks + k) * C + c]);
      }
      write_moments(moments, mean, var, gc);
    }
  });
}

// sum(dy) and sum(dy * (x - mean)) per (group, channel).
// mean_stride: C, or 0 for a mean shared by the groups.
template <typename scalar_t, typename acc_t>
void backward_reduce_kernel(const scalar_t* dy, const scalar_t* x, const acc_t* mean, int64_t mean_stride,
                            acc_t* sum_dy, acc_t* sum_dy_xmu, const BatchNormLayout& l) {
  const int64_t C = l.channels, R = l.rows, S = l.inner;
  if (!l.channels_last) {
    at::parallel_for(0, l.groups * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t gc = begin; gc < end; ++gc) {
        const int64_t g = gc / C, c = gc % C;
        const acc_t mu = mean[g * mean_stride + c];
        acc_t total_dy = 0, total_dy_xmu = 0;
        for (int64_t m = 0; m < R; ++m) {
          const int64_t offset = ((g * R + m) * C + c) * S;
          const auto [row_dy, row_dy_xmu] = row_sums<acc_t, 2>(S, [&](int64_t i, auto lanes) {
            using T = decltype(lanes);
            const T d = load_as<T>(dy + offset + i);
            return std::array{d, d * (load_as<T>(x + offset + i) - mu)};
          });
          total_dy += row_dy;
          total_dy_xmu += row_dy_xmu;
        }
        sum_dy[gc] = total_dy;
        sum_dy_xmu[gc] = total_dy_xmu;
      }
    });
    return;
  }
  const int64_t chunks = chunks_of(R);
  std::vector<acc_t> part_dy(l.groups * chunks * C, 0), part_dy_xmu(l.groups * chunks * C, 0);
  at::parallel_for(0, l.groups * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gk = begin; gk < end; ++gk) {
      const int64_t g = gk / chunks, first = (gk % chunks) * kRowsPerChunk;
      const int64_t last = std::min(R, first + kRowsPerChunk);
      for_channel_blocks<acc_t>(C, [&](int64_t c0, auto count, auto lanes) {
        using T = decltype(lanes);
        constexpr int64_t W = kWidth<T>;
        T pd[kChannelBlock / W] = {}, pdx[kChannelBlock / W] = {}, mu[kChannelBlock / W] = {};
        for (int64_t k = 0; k < count; ++k) mu[k] = load_as<T>(mean + g * mean_stride + c0 + k * W);
        for (int64_t r = first; r < last; ++r) {
          const int64_t offset = (g * R + r) * C + c0;
          for (int64_t k = 0; k < count; ++k) {
            const T d = load_as<T>(dy + offset + k * W);
            pd[k] += d;
            pdx[k] += d * (load_as<T>(x + offset + k * W) - mu[k]);
          }
        }
        for (int64_t k = 0; k < count; ++k) {
          store_as(part_dy.data() + gk * C + c0 + k * W, pd[k]);
          store_as(part_dy_xmu.data() + gk * C + c0 + k * W, pdx[k]);
        }
      });
    }
  });
  for (int64_t g = 0; g < l.groups; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      acc_t total_dy = 0, total_dy_xmu = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        total_dy += part_dy[(g * chunks + k) * C + c];
        total_dy_xmu += part_dy_xmu[(g * chunks + k) * C + c];
      }
      sum_dy[g * C + c] = total_dy;
      sum_dy_xmu[g * C + c] = total_dy_xmu;
    }
  }
}

// out = a * ka + b * kb + k0 with per-(group, channel) constants; b is optional (kb unused then).
template <typename scalar_t, typename acc_t, bool kTwoInputs>
void channel_affine_kernel(scalar_t* out, const scalar_t* a, const acc_t* ka, const scalar_t* b, const acc_t* kb,
                           const acc_t* k0, const BatchNormLayout& l) {
  const int64_t C = l.channels, R = l.rows, S = l.inner;
  if (!l.channels_last) {
    const int64_t rows = l.groups * R * C;  // rows of S elements
    at::parallel_for(0, rows, std::max<int64_t>(1, kElementsPerTask / S), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t gc = (row / (R * C)) * C + row % C;
        const acc_t fa = ka[gc], f0 = k0[gc];
        const acc_t fb = kTwoInputs ? kb[gc] : acc_t(0);
        const int64_t offset = row * S;
        for_each_lane<acc_t>(S, [&](int64_t i, auto lanes) {
          using T = decltype(lanes);
          T value = load_as<T>(a + offset + i) * fa + f0;
          if constexpr (kTwoInputs) value += load_as<T>(b + offset + i) * fb;
          store_as(out + offset + i, value);
        });
      }
    });
    return;
  }
  at::parallel_for(0, l.groups * R, std::max<int64_t>(1, kElementsPerTask / C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / R, offset = row * C;
      const acc_t* fa = ka + g * C;
      const acc_t* f0 = k0 + g * C;
      const acc_t* fb = kTwoInputs ? kb + g * C : nullptr;
      for_each_lane<acc_t>(C, [&](int64_t c, auto lanes) {
        using T = decltype(lanes);
        T value = load_as<T>(a + offset + c) * load_as<T>(fa + c) + load_as<T>(f0 + c);
        if constexpr (kTwoInputs) value += load_as<T>(b + offset + c) * load_as<T>(fb + c);
        store_as(out + offset + c, value);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& input, int64_t groups) {
  check_stats_arguments(input, groups);
  at::Tensor x;
  BatchNormLayout layout;
  std::tie(x, layout) = batch_norm_layout(input, groups);
  const auto options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  at::Tensor mean = at::empty({groups, layout.channels}, options);
  at::Tensor var = at::empty({groups, layout.channels}, options);
  if (x.numel() == 0) return {mean.fill_(NAN), var.fill_(NAN)};  // no values: no statistics
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), layout);
  });
  return {mean, var};
}

at::Tensor elemt_cpu(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  check_elemt_arguments(input, mean, var, weight, bias, eps, groups, scale);
  at::Tensor x;
  BatchNormLayout layout;
  std::tie(x, layout) = batch_norm_layout(input, groups);
  const int64_t C = layout.channels, GC = groups * C;
  const at::Tensor mu = accumulation_typed(mean, input), sigma2 = accumulation_typed(var, input);
  const at::Tensor w = accumulation_typed(weight, input), b = accumulation_typed(bias, input);
  const at::Tensor s = accumulation_typed(scale, input);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t ms = group_stride(mu, C), ws = group_stride(w, C), bs = group_stride(b, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // y = x * k + shift, k = w / sqrt(var + eps) * s, shift = b * s - mean * k
    std::vector<acc_t> factor(GC), shift(GC);
    const acc_t *m = mu.const_data_ptr<acc_t>(), *v = sigma2.const_data_ptr<acc_t>();
    const acc_t *pw = data_or_null<acc_t>(w), *pb = data_or_null<acc_t>(b), *ps = data_or_null<acc_t>(s);
    for (int64_t gc = 0; gc < GC; ++gc) {
      const int64_t g = gc / C, c = gc % C;
      const acc_t step = ps ? ps[g] : acc_t(1);
      factor[gc] = step * (pw ? pw[g * ws + c] : acc_t(1)) / std::sqrt(v[g * ms + c] + static_cast<acc_t>(eps));
      shift[gc] = step * (pb ? pb[g * bs + c] : acc_t(0)) - m[g * ms + c] * factor[gc];
    }
    channel_affine_kernel<scalar_t, acc_t, false>(
        out.data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), factor.data(), nullptr, nullptr, shift.data(), layout);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups) {
  check_backward_reduce_arguments(grad_output, input, mean, groups);
  at::Tensor x;
  BatchNormLayout layout;
  std::tie(x, layout) = batch_norm_layout(input, groups);
  const at::Tensor dy = like_layout(grad_output, layout);
  const at::Tensor mu = accumulation_typed(mean, input);
  at::Tensor sum_dy = at::empty({groups, layout.channels}, mu.options());
  at::Tensor sum_dy_xmu = at::empty({groups, layout.channels}, mu.options());
  if (x.numel() == 0) return {sum_dy.zero_(), sum_dy_xmu.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_reduce_kernel<scalar_t, acc_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mu.const_data_ptr<acc_t>(),
        group_stride(mu, layout.channels), sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>(), layout);
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elemt_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    c10::SymInt count, int64_t groups, const std::optional<at::Tensor>& scale) {
  check_backward_elemt_arguments(
      grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, eps, count, groups, scale);
  at::Tensor x;
  BatchNormLayout layout;
  std::tie(x, layout) = batch_norm_layout(input, groups);
  const at::Tensor dy = like_layout(grad_output, layout);
  const int64_t C = layout.channels, GC = groups * C;
  const at::Tensor mu = accumulation_typed(mean, input), sigma2 = accumulation_typed(var, input);
  const at::Tensor s_dy = accumulation_typed(sum_dy, input), s_dy_xmu = accumulation_typed(sum_dy_xmu, input);
  const at::Tensor w = accumulation_typed(weight, input), s = accumulation_typed(scale, input);
  const int64_t n = count.expect_int();  // values per (group, channel), over every process when synchronised
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t ms = group_stride(mu, C), ws = group_stride(w, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_elemt", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // dx = (dy * step - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * invstd * w
    //    = dy * k_dy + x * k_x + k_shift
    std::vector<acc_t> k_dy(GC), k_x(GC), k_shift(GC);
    const acc_t *m = mu.const_data_ptr<acc_t>(), *v = sigma2.const_data_ptr<acc_t>();
    const acc_t *sd = s_dy.const_data_ptr<acc_t>(), *sdx = s_dy_xmu.const_data_ptr<acc_t>();
    const acc_t *pw = data_or_null<acc_t>(w), *ps = data_or_null<acc_t>(s);
    for (int64_t gc = 0; gc < GC; ++gc) {
      const int64_t g = gc / C, c = gc % C, at = g * ms + c;
      const acc_t invstd = acc_t(1) / std::sqrt(v[at] + static_cast<acc_t>(eps));
      const acc_t k = invstd * (pw ? pw[g * ws + c] : acc_t(1));
      k_dy[gc] = k * (ps ? ps[g] : acc_t(1));
      k_x[gc] = -k * invstd * invstd * sdx[at] / static_cast<acc_t>(n);
      k_shift[gc] = -k * sd[at] / static_cast<acc_t>(n) - m[at] * k_x[gc];
    }
    channel_affine_kernel<scalar_t, acc_t, true>(
        out.data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), k_dy.data(), x.const_data_ptr<scalar_t>(),
        k_x.data(), k_shift.data(), layout);
  });
  return out;
}

// Running statistics as torch.nn updates them. [C] ones once per group in order: with per-step
// statistics (G = T) that is what T calls of torch.nn.BatchNorm would do. [G, C] ones row by row,
// one batch counted (T BatchNorms called once each).
void update_stats_cpu(
    const at::Tensor& mean, const at::Tensor& var, c10::SymInt count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum) {
  check_update_stats_arguments(mean, var, count, running_mean, running_var, num_batches_tracked);
  const int64_t C = mean.size(1), n = count.expect_int();
  const bool rows = running_mean.dim() == 2;  // one row per group
  const int64_t batches_counted = rows ? 1 : mean.size(0);
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (n == 0) {  // an empty batch is counted, as torch.nn counts it, and leaves the statistics
    if (tracked) num_batches_tracked->add_(batches_counted);
    return;
  }
  // float statistics are read as they are (no cast ops: this runs once per training step)
  const auto stat_type = mean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor m = dense(cast(mean, stat_type)), v = dense(cast(var, stat_type));
  int64_t* batches = tracked ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "batch_norm_update_stats", [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const int64_t before = batches ? *batches : 0;
    const auto update = [&](const auto* mean_data, const auto* var_data) {
      for (int64_t g = 0; g < mean.size(0); ++g) {
        double factor = momentum.value_or(0.0);
        // cumulative average over the batches counted so far
        if (batches && !momentum.has_value()) factor = 1.0 / static_cast<double>(before + (rows ? 1 : g + 1));
        const int64_t row = rows ? g * C : 0;
        for (int64_t c = 0; c < C; ++c) {
          const double mg = static_cast<double>(mean_data[g * C + c]), vg = static_cast<double>(var_data[g * C + c]);
          rm[row + c] = static_cast<scalar_t>((1 - factor) * static_cast<double>(rm[row + c]) + factor * mg);
          rv[row + c] = static_cast<scalar_t>((1 - factor) * static_cast<double>(rv[row + c]) + factor * vg * n / (n - 1));
        }
      }
      if (batches) *batches = before + batches_counted;
    };
    if (stat_type == at::kDouble) {
      update(m.const_data_ptr<double>(), v.const_data_ptr<double>());
    } else {
      update(m.const_data_ptr<float>(), v.const_data_ptr<float>());
    }
  });
}

}  // namespace

template <>
const matterhorn::ops::cpu::BatchNormKernels&
matterhorn::ops::cpu::batch_norm_kernels<matterhorn::ops::cpu::Capability::MATTERHORN_CPU_CAPABILITY>() {
  static const BatchNormKernels kernels{&stats_cpu, &elemt_cpu, &backward_reduce_cpu, &backward_elemt_cpu,
                                        &update_stats_cpu};
  return kernels;
}
