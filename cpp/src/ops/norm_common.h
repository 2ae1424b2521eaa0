#pragma once
// Helpers shared by the normalizations' kernels (BatchNorm's and LayerNorm's, CPU and CUDA): one
// name each.
#include <limits>
#include <optional>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace matterhorn::ops::detail {

// Conversions that call no op when nothing changes: a kernel below autograd must not hand back
// its input as a new result (aten::to and aten::contiguous would return it as is).
inline at::Tensor cast(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}
inline at::Tensor dense(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// An optional tensor that is there; an undefined tensor as an absent one.
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
inline std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A parameter or statistic beside `input` as dense values of the input's accumulation type
// (float32 for float16/bfloat16 inputs, whose parameters may be either); undefined if absent.
inline at::Tensor accumulation_typed(const at::Tensor& t, const at::Tensor& input) {
  return t.defined() ? dense(cast(t, at::toOpMathType(input.scalar_type()))) : at::Tensor();
}
inline at::Tensor accumulation_typed(const std::optional<at::Tensor>& t, const at::Tensor& input) {
  return t.has_value() ? accumulation_typed(*t, input) : at::Tensor();
}

// The values of a dense tensor, or nullptr when it is undefined.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Count, mean and sum of squared deviations, merged with Chan's formula (numerically safe);
// shared by the CPU and CUDA kernels. The count is an integer so that it stays exact at any size
// (a float count stops growing at 2^24). No values: mean and variance are NaN, as torch.var_mean's.
template <typename acc_t>
struct Moments {
  int64_t count = 0;
  acc_t mean = 0, m2 = 0;
  C10_HOST_DEVICE void merge(int64_t n, acc_t other_mean, acc_t other_m2) {
    if (n == 0) return;
    const int64_t total = count + n;
    const acc_t share = static_cast<acc_t>(n) / static_cast<acc_t>(total);
    const acc_t delta = other_mean - mean;
    mean += delta * share;
    m2 += other_m2 + delta * delta * static_cast<acc_t>(count) * share;
    count = total;
  }
  C10_HOST_DEVICE void merge(const Moments& other) { merge(other.count, other.mean, other.m2); }
  // mean and biased variance of (group, channel) `at`
  C10_HOST_DEVICE void write(acc_t* means, acc_t* vars, int64_t at) const {
    const acc_t none = std::numeric_limits<acc_t>::quiet_NaN();
    means[at] = count > 0 ? mean : none;
    vars[at] = count > 0 ? m2 / static_cast<acc_t>(count) : none;
  }
};

}  // namespace matterhorn::ops::detail
