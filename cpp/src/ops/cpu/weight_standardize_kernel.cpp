// CPU kernels of the weight standardisation building blocks (see ops/weight_standardize.h). One
// task handles whole output channels: forward, a row's mean and squared deviations (two passes
// over the row in cache) and then its output; backward, one pass writing dw and summing dgamma and
// dbeta. Tasks are split over channels, so the result does not depend on the thread count.
// Accumulation in float32 (float16/bfloat16/float32 weights) or float64. Compiled once per CPU
// capability; the ops call the build cpu/dispatch.cpp chooses.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "ops/norm_common.h"  // cast, dense
#include "ops/cpu/dispatch.h"
#include "ops/cpu/vectorized.h"
#include "ops/weight_standardize.h"

namespace {

using matterhorn::ops::detail::check_weight_standardize;
using matterhorn::ops::detail::check_weight_standardize_backward;
using matterhorn::ops::detail::dense;
using matterhorn::ops::detail::empty_like_weight;
using matterhorn::ops::detail::has_dense_rows;
using matterhorn::ops::cpu::for_each_lane;
using matterhorn::ops::cpu::load_as;
using matterhorn::ops::cpu::mean_and_m2;
using matterhorn::ops::cpu::row_sums;
using matterhorn::ops::cpu::store_as;

constexpr int64_t kElementsPerTask = 32768;  // smallest parallel task

int64_t rows_per_task(int64_t K) { return std::max<int64_t>(1, kElementsPerTask / K); }

// The weight with each channel's values as one block: itself when it has dense rows.
at::Tensor with_dense_rows(const at::Tensor& weight) { return has_dense_rows(weight) ? weight : weight.contiguous(); }

// t in the memory layout of `like` (a tensor of the same shape with dense rows).
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  return t.strides() == like.strides() ? t : at::empty_like(like).copy_(t);
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* w, const scalar_t* gamma, const scalar_t* beta, scalar_t* out, acc_t* mean,
                    acc_t* rstd, int64_t O, int64_t K, acc_t eps) {
  // sqrt(var_unbiased * K) = sqrt(m2 * K / (K - 1))
  const acc_t unbias = static_cast<acc_t>(K) / static_cast<acc_t>(K - 1);
  at::parallel_for(0, O, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const scalar_t* wr = w + o * K;
      scalar_t* yr = out + o * K;
      const auto [mu, m2] = mean_and_m2<acc_t>(wr, K);
      const acc_t r = acc_t(1) / (std::sqrt(m2 * unbias) + eps);
      const acc_t scale = gamma != nullptr ? r * static_cast<acc_t>(gamma[o]) : r;
      const acc_t shift = beta != nullptr ? static_cast<acc_t>(beta[o]) : acc_t(0);
      mean[o] = mu;
      rstd[o] = r;
      for_each_lane<acc_t>(K, [&](int64_t i, auto lanes) {
        using T = decltype(lanes);
        store_as(yr + i, (load_as<T>(wr + i) - mu) * scale + shift);
      });
    }
  });
}

// dw = dy * rstd * gamma; dgamma = rstd * sum(dy * (w - mean)); dbeta = sum(dy), per channel.
template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* dy, const scalar_t* w, const acc_t* mean, const acc_t* rstd,
                     const scalar_t* gamma, scalar_t* dw, acc_t* dgamma, acc_t* dbeta, int64_t O, int64_t K) {
  at::parallel_for(0, O, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const scalar_t* dyr = dy + o * K;
      const scalar_t* wr = w + o * K;
      scalar_t* dwr = dw + o * K;
      const acc_t mu = mean[o], r = rstd[o];
      const acc_t scale = gamma != nullptr ? r * static_cast<acc_t>(gamma[o]) : r;
      const auto [sum_dy, sum_dy_wc] = row_sums<acc_t, 2>(K, [&](int64_t i, auto lanes) {
        using T = decltype(lanes);
        const T d = load_as<T>(dyr + i);
        store_as(dwr + i, d * scale);
        return std::array{d, d * (load_as<T>(wr + i) - mu)};
      });
      if (dgamma != nullptr) dgamma[o] = sum_dy_wc * r;
      dbeta[o] = sum_dy;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  check_weight_standardize(weight, gamma, beta, eps);
  const at::Tensor w = with_dense_rows(weight);
  const std::optional<at::Tensor> g = gamma.has_value() && gamma->defined() ? std::optional(dense(*gamma)) : std::nullopt;
  const std::optional<at::Tensor> b = beta.has_value() && beta->defined() ? std::optional(dense(*beta)) : std::nullopt;
  const auto stats_options = w.options().dtype(at::toOpMathType(w.scalar_type()));
  const int64_t O = w.size(0), K = O == 0 ? 0 : w.numel() / O;
  at::Tensor out = empty_like_weight(weight);
  at::Tensor mean = at::empty({O}, stats_options), rstd = at::empty({O}, stats_options);
  if (K == 0) {  // channels without values: statistics NaN, as torch.var_mean's
    return {out, mean.fill_(std::numeric_limits<double>::quiet_NaN()),
            rstd.fill_(std::numeric_limits<double>::quiet_NaN())};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "weight_standardize_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(
        w.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(g), data_or_null<scalar_t>(b),
        out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), O, K,
        static_cast<acc_t>(eps));
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma) {
  check_weight_standardize_backward(grad_output, weight, mean, rstd, gamma);
  const at::Tensor w = with_dense_rows(weight);
  const at::Tensor dy = in_layout_of(grad_output, w), m = dense(mean), r = dense(rstd);
  const bool affine = gamma.has_value() && gamma->defined();
  const std::optional<at::Tensor> g = affine ? std::optional(dense(*gamma)) : std::nullopt;
  const auto acc_type = at::toOpMathType(w.scalar_type());
  const int64_t O = w.size(0), K = O == 0 ? 0 : w.numel() / O;
  at::Tensor dw = empty_like_weight(weight);
  // the per-channel sums in the accumulation type, handed back in the parameters' dtype
  at::Tensor dgamma = at::empty({affine ? O : 0}, w.options().dtype(acc_type));
  at::Tensor dbeta = at::empty({O}, w.options().dtype(acc_type));
  if (K == 0) {  // empty sums
    dgamma.zero_();
    dbeta.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "weight_standardize_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(
          dy.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(),
          r.const_data_ptr<acc_t>(), data_or_null<scalar_t>(g), dw.mutable_data_ptr<scalar_t>(),
          affine ? dgamma.mutable_data_ptr<acc_t>() : nullptr, dbeta.mutable_data_ptr<acc_t>(), O, K);
    });
  }
  using matterhorn::ops::detail::cast;
  return {dw, affine ? cast(dgamma, w.scalar_type()) : at::empty({0}, w.options()), cast(dbeta, w.scalar_type())};
}

}  // namespace

template <>
const matterhorn::ops::cpu::WeightStandardizeKernels& matterhorn::ops::cpu::weight_standardize_kernels<
    matterhorn::ops::cpu::Capability::MATTERHORN_CPU_CAPABILITY>() {
  static const WeightStandardizeKernels kernels{&forward_cpu, &backward_cpu};
  return kernels;
}
