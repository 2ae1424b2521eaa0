// CPU kernels of the LayerNorm building blocks (see ops/layer_norm.h). One pass over memory each
// way: forward, a row's moments and then its output while the row is in cache; backward, a row's
// two sums and then its input gradient, the weight and bias gradients summed per task in cache and
// merged in task order (the same result every run at a given thread count). float32
// accumulation for float16/bfloat16, whose parameters may be float16/bfloat16 or float32.
// Compiled once per CPU capability; the ops call the build cpu/dispatch.cpp chooses.
#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include "ops/cpu/dispatch.h"
#include "ops/cpu/vectorized.h"
#include "ops/layer_norm.h"
#include "ops/norm_common.h"

namespace {

using matterhorn::ops::detail::Moments;
using matterhorn::ops::detail::cast;
using matterhorn::ops::detail::check_layer_norm_backward_block;
using matterhorn::ops::detail::check_layer_norm_block;
using matterhorn::ops::detail::dense;
using matterhorn::ops::detail::accumulation_typed;
using matterhorn::ops::detail::data_or_null;
using matterhorn::ops::detail::statistics_shape;
using matterhorn::ops::cpu::add_to;
using matterhorn::ops::cpu::for_each_lane;
using matterhorn::ops::cpu::load_as;
using matterhorn::ops::cpu::mean_and_m2;
using matterhorn::ops::cpu::row_sums;
using matterhorn::ops::cpu::store_as;

constexpr int64_t kElementsPerTask = 32768;  // smallest parallel task
constexpr int64_t kChunk = 4096;             // a row's moments per chunk (in L1), merged with Chan's formula

int64_t rows_per_task(int64_t D) { return std::max<int64_t>(1, kElementsPerTask / D); }

// Calls f with compile-time flags for "has weight" and "has bias": each combination gets its own
// vectorised loop, with no test per element.
template <typename F>
void with_affine(bool weight, bool bias, F&& f) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (weight && bias) f(Yes{}, Yes{});
  else if (weight) f(Yes{}, No{});
  else if (bias) f(No{}, Yes{});
  else f(No{}, No{});
}

template <typename scalar_t, typename acc_t>
Moments<acc_t> row_moments(const scalar_t* row, int64_t D) {
  Moments<acc_t> moments;
  for (int64_t first = 0; first < D; first += kChunk) {
    const int64_t n = std::min(kChunk, D - first);
    const auto [mean, m2] = mean_and_m2<acc_t>(row + first, n);
    moments.merge(n, mean, m2);
  }
  return moments;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* x, const acc_t* w, const acc_t* b, scalar_t* y, acc_t* mean,
                    acc_t* rstd, int64_t N, int64_t D, acc_t eps) {
  with_affine(w != nullptr, b != nullptr, [&](auto has_weight, auto has_bias) {
    constexpr bool kWeight = decltype(has_weight)::value, kBias = decltype(has_bias)::value;
    at::parallel_for(0, N, rows_per_task(D), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* xr = x + n * D;
        scalar_t* yr = y + n * D;
        const auto moments = row_moments<scalar_t, acc_t>(xr, D);
        const acc_t mu = moments.mean, r = acc_t(1) / std::sqrt(moments.m2 / static_cast<acc_t>(D) + eps);
        mean[n] = mu;
        rstd[n] = r;
        for_each_lane<acc_t>(D, [&](int64_t i, auto lanes) {
          using T = decltype(lanes);
          T v = (load_as<T>(xr + i) - mu) * r;
          if constexpr (kWeight) v = v * load_as<T>(w + i);
          if constexpr (kBias) v = v + load_as<T>(b + i);
          store_as(yr + i, v);
        });
      }
    });
  });
}

// dx = rstd * (dy*w - (sum(dy*w) + xhat * sum(dy*w*xhat)) / D), xhat = (x - mean) * rstd;
// dw = sum over rows of dy * xhat, db = sum over rows of dy (only with a weight).
// Rows go in blocks of kRows: first each row's two sums (pure reductions), then one pass over the
// block that writes each row's dx and adds the block's dw/db terms, summed in registers, to the
// task's partial sums: one load and store of those per block instead of per row.
template <int kRows, bool kWeight, typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* dy, const scalar_t* x, const acc_t* mean, const acc_t* rstd, const acc_t* w,
                   scalar_t* dx, acc_t* dw_sum, acc_t* db_sum, int64_t D) {
  const acc_t inv_D = acc_t(1) / static_cast<acc_t>(D);
  std::array<acc_t, kRows> mu, r, mean_g, mean_g_xhat;  // mean_g* = sum(g*) / D, g = dy * w
  for (int k = 0; k < kRows; ++k) {
    const scalar_t* dyr = dy + k * D;
    const scalar_t* xr = x + k * D;
    mu[k] = mean[k];
    r[k] = rstd[k];
    const auto [sum_g, sum_g_xhat] = row_sums<acc_t, 2>(D, [&](int64_t i, auto lanes) {
      using T = decltype(lanes);
      const T xhat = (load_as<T>(xr + i) - mu[k]) * r[k];
      T g = load_as<T>(dyr + i);
      if constexpr (kWeight) g = g * load_as<T>(w + i);
      return std::array{g, g * xhat};
    });
    mean_g[k] = sum_g * inv_D;
    mean_g_xhat[k] = sum_g_xhat * inv_D;
  }
  for_each_lane<acc_t>(D, [&](int64_t i, auto lanes) {
    using T = decltype(lanes);
    T weight_i{}, dw_i{}, db_i{};
    if constexpr (kWeight) weight_i = load_as<T>(w + i);
    for (int k = 0; k < kRows; ++k) {
      const T d = load_as<T>(dy + k * D + i), xhat = (load_as<T>(x + k * D + i) - mu[k]) * r[k];
      T g = d;
      if constexpr (kWeight) {
        g = g * weight_i;
        dw_i = dw_i + d * xhat;
        db_i = db_i + d;
      }
      store_as(dx + k * D + i, r[k] * (g - mean_g[k] - xhat * mean_g_xhat[k]));
    }
    if constexpr (kWeight) {
      add_to(dw_sum + i, dw_i);
      add_to(db_sum + i, db_i);
    }
  });
}

constexpr int kRows = 4;

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* dy, const scalar_t* x, const acc_t* mean, const acc_t* rstd, const acc_t* w,
                     scalar_t* dx, acc_t* dw, acc_t* db, int64_t N, int64_t D) {
  // One task per thread (at most), each with its own partial sums of dw and db: two rows of a tensor
  // (64-byte aligned by torch's allocator) padded to whole cache lines, so that no vector load or
  // store of them, made once per block of rows, splits a cache line.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / rows_per_task(D)));
  constexpr int64_t kLine = 64 / sizeof(acc_t);
  const int64_t stride = (D + kLine - 1) / kLine * kLine;
  const at::Tensor partial_sums = at::zeros(
      {w != nullptr ? tasks * 2 : 0, stride}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* partial = partial_sums.mutable_data_ptr<acc_t>();
  with_affine(w != nullptr, false, [&](auto has_weight, auto) {
    constexpr bool kWeight = decltype(has_weight)::value;
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        acc_t* dw_sum = kWeight ? partial + task * 2 * stride : nullptr;
        acc_t* db_sum = kWeight ? dw_sum + stride : nullptr;
        const int64_t end = N * (task + 1) / tasks;
        int64_t n = N * task / tasks;
        for (; n + kRows <= end; n += kRows) {
          backward_rows<kRows, kWeight>(dy + n * D, x + n * D, mean + n, rstd + n, w, dx + n * D, dw_sum, db_sum, D);
        }
        for (; n < end; ++n) {
          backward_rows<1, kWeight>(dy + n * D, x + n * D, mean + n, rstd + n, w, dx + n * D, dw_sum, db_sum, D);
        }
      }
    });
  });
  if (w == nullptr) return;
  at::parallel_for(0, D, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t dw_i = 0, db_i = 0;
      for (int64_t task = 0; task < tasks; ++task) {
        dw_i += partial[task * 2 * stride + i];
        db_i += partial[task * 2 * stride + stride + i];
      }
      dw[i] = dw_i;
      db[i] = db_i;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> normalize_cpu(
    const at::Tensor& input, c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_layer_norm_block("layer_norm_normalize", input, normalized_shape, weight, bias);
  const at::Tensor x = dense(input), w = accumulation_typed(weight, input), b = accumulation_typed(bias, input);
  const auto stats_shape = C10_AS_INTARRAYREF_SLOW(statistics_shape(input, normalized_shape));
  const auto stats_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty(stats_shape, stats_options), rstd = at::empty(stats_shape, stats_options);
  const int64_t N = mean.numel(), D = N == 0 ? 1 : x.numel() / N;
  if (x.numel() == 0) {  // no rows, or rows of no values (whose statistics are NaN)
    return {y, mean.fill_(NAN), rstd.fill_(NAN)};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_normalize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), data_or_null<acc_t>(w), data_or_null<acc_t>(b), y.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), N, D, static_cast<acc_t>(eps));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight) {
  check_layer_norm_backward_block(grad_output, input, normalized_shape, mean, rstd, weight);
  const at::Tensor x = dense(input), dy = dense(grad_output), m = dense(mean), r = dense(rstd);
  const at::Tensor w = accumulation_typed(weight, input);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  // the parameters' gradients in the accumulation type, handed back in the weight's dtype
  at::Tensor dw = w.defined() ? at::zeros_like(w) : at::empty({0}, x.options());
  at::Tensor db = w.defined() ? at::zeros_like(w) : at::empty({0}, x.options());
  const int64_t N = m.numel(), D = N == 0 ? 1 : x.numel() / N;
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(),
          r.const_data_ptr<acc_t>(), data_or_null<acc_t>(w), dx.mutable_data_ptr<scalar_t>(),
          w.defined() ? dw.mutable_data_ptr<acc_t>() : nullptr, w.defined() ? db.mutable_data_ptr<acc_t>() : nullptr,
          N, D);
    });
  }
  if (!w.defined()) return {dx, dw, db};
  return {dx, cast(dw, weight->scalar_type()), cast(db, weight->scalar_type())};
}

}  // namespace

template <>
const matterhorn::ops::cpu::LayerNormKernels&
matterhorn::ops::cpu::layer_norm_kernels<matterhorn::ops::cpu::Capability::MATTERHORN_CPU_CAPABILITY>() {
  static const LayerNormKernels kernels{&normalize_cpu, &backward_cpu};
  return kernels;
}
