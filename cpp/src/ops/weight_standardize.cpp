// matterhorn::weight_standardize: the effective weight of WSLinear / WSConv1d/2d/3d (see
// ops/weight_standardize.h). Schemas of the op and its building blocks, their shared checks, the
// ATen formulation (CUDA kernels, and the autograd paths torch differentiates further) and the
// C++ entry.
#include "ops/weight_standardize.h"

#include <numeric>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/var_mean.h>
#include <c10/util/irange.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "matterhorn/ops/weight_standardize.h"
#include "ops/norm_common.h"  // cast
#include "ops/checks.h"

namespace matterhorn::ops {
namespace detail {
namespace {

constexpr const char* kOp = "weight_standardize";

// The values per output channel: the product of every size but the first.
c10::SymInt fan_in(const at::Tensor& weight) {
  c10::SymInt K = 1;
  for (const auto d : c10::irange(int64_t{1}, weight.dim())) K = K * weight.sym_size(d);
  return K;
}

// [O, 1, ...]: a per-channel vector viewed against the weight.
c10::SymDimVector per_channel_shape(const at::Tensor& weight) {
  c10::SymDimVector shape(weight.dim(), 1);
  shape[0] = weight.sym_size(0);
  return shape;
}

std::vector<int64_t> channel_dims(const at::Tensor& weight) {
  std::vector<int64_t> dims(weight.dim() - 1);
  std::iota(dims.begin(), dims.end(), int64_t{1});
  return dims;
}

bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_per_channel(const char* op, const at::Tensor& weight, const at::Tensor& t, const char* name,
                       at::ScalarType dtype) {
  TORCH_CHECK_VALUE(
      t.dim() == 1 && t.sym_size(0) == weight.sym_size(0), op, ": expected ", name, " of shape [",
      weight.sym_size(0), "] (one value per output channel of the weight ", weight.sym_sizes(), "), got ",
      t.sym_sizes());
  TORCH_CHECK_TYPE(
      t.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype_name(dtype), ", got ",
      dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(
      t.device() == weight.device(), op, ": ", name, " is on ", t.device(), " but the weight is on ",
      weight.device());
}

}  // namespace

void check_weight_standardize(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(weight.scalar_type()), kOp, ": expected a floating-point weight, got ",
      dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(
      weight.dim() >= 2, kOp, ": expected a weight [out, in, ...] of 2 or more dimensions, got ",
      weight.sym_sizes());
  TORCH_CHECK_VALUE(
      fan_in(weight) != 1, kOp, ": an unbiased variance needs 2 or more weights per output channel; got a "
      "weight ", weight.sym_sizes(), " (fan_in = 1)");
  for (const auto& [param, name] : {std::pair{&gamma, "gamma"}, std::pair{&beta, "beta"}}) {
    if (defined(*param)) check_per_channel(kOp, weight, **param, name, weight.scalar_type());
  }
  TORCH_CHECK_VALUE(eps >= 0, kOp, ": eps must be >= 0, got ", eps);  // NaN fails too
}

void check_weight_standardize_backward(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma) {
  constexpr const char* op = "weight_standardize_backward";
  TORCH_CHECK_TYPE(
      at::isFloatingType(weight.scalar_type()), op, ": expected a floating-point weight, got ",
      dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(
      weight.dim() >= 2, op, ": expected a weight [out, in, ...] of 2 or more dimensions, got ", weight.sym_sizes());
  TORCH_CHECK_VALUE(
      grad_output.sym_sizes() == weight.sym_sizes(), op, ": expected grad_output of the weight's shape ",
      weight.sym_sizes(), ", got ", grad_output.sym_sizes());
  TORCH_CHECK_TYPE(
      grad_output.scalar_type() == weight.scalar_type(), op, ": expected grad_output of the weight's dtype ",
      dtype_name(weight.scalar_type()), ", got ", dtype_name(grad_output.scalar_type()));
  TORCH_CHECK_VALUE(
      grad_output.device() == weight.device(), op, ": grad_output is on ", grad_output.device(),
      " but the weight is on ", weight.device());
  const auto acc_type = at::toOpMathType(weight.scalar_type());
  check_per_channel(op, weight, mean, "mean", acc_type);
  check_per_channel(op, weight, rstd, "rstd", acc_type);
  if (defined(gamma)) check_per_channel(op, weight, *gamma, "gamma", weight.scalar_type());
}

bool has_dense_rows(const at::Tensor& weight) {
  if (weight.is_contiguous()) return true;
  // a permutation of a dense layout in which dimension 0 is outermost (channels_last, for one)
  return weight.is_non_overlapping_and_dense() &&
         (weight.sym_size(0) <= 1 || weight.sym_stride(0) * weight.sym_size(0) == weight.sym_numel());
}

at::Tensor empty_like_weight(const at::Tensor& weight) {
  // empty_like keeps a dense tensor's strides exactly
  return has_dense_rows(weight) ? at::empty_like(weight) : at::empty_like(weight, at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_forward_aten(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  const auto acc_type = at::toOpMathType(weight.scalar_type());
  const auto per_channel = per_channel_shape(weight);
  at::Tensor mean, rstd;
  {  // constants to autograd, forward mode included (detach drops both)
    at::NoGradGuard no_grad;
    at::Tensor var;
    std::tie(var, mean) = at::var_mean(cast(weight.detach(), acc_type), channel_dims(weight), 1, false);
    rstd = var.mul(c10::Scalar(fan_in(weight))).sqrt_().add_(eps).reciprocal_();
  }
  at::Tensor scale = defined(gamma) ? rstd * cast(*gamma, acc_type) : rstd;
  at::Tensor out = (cast(weight, acc_type) - mean.view_symint(per_channel)) * scale.view_symint(per_channel);
  if (defined(beta)) out = out + cast(*beta, acc_type).view_symint(per_channel);
  return {cast(out, weight.scalar_type()), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_standardize_backward_aten(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma) {
  const auto acc_type = at::toOpMathType(weight.scalar_type());
  const auto per_channel = per_channel_shape(weight);
  const auto dims = channel_dims(weight);
  const at::Tensor dy = cast(grad_output, acc_type);
  const at::Tensor scale = defined(gamma) ? rstd * cast(*gamma, acc_type) : rstd;
  at::Tensor grad_weight = cast(dy * scale.view_symint(per_channel), weight.scalar_type());
  at::Tensor grad_gamma = defined(gamma)
      ? cast((dy * (cast(weight, acc_type) - mean.view_symint(per_channel))).sum(dims) * rstd, gamma->scalar_type())
      : at::empty({0}, weight.options());
  at::Tensor grad_beta = cast(dy.sum(dims), weight.scalar_type());
  return {grad_weight, grad_gamma, grad_beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_weight_standardize_forward(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::weight_standardize_forward", "")
                             .typed<decltype(call_weight_standardize_forward)>();
  return op.call(weight, gamma, beta, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_weight_standardize_backward(
    const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& gamma) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::weight_standardize_backward", "")
                             .typed<decltype(call_weight_standardize_backward)>();
  return op.call(grad_output, weight, mean, rstd, gamma);
}

}  // namespace detail

namespace {

at::Tensor weight_standardize_composite(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  return std::get<0>(detail::call_weight_standardize_forward(weight, gamma, beta, eps));
}

}  // namespace

at::Tensor weight_standardize(
    const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
    double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("matterhorn::weight_standardize", "")
                             .typed<decltype(weight_standardize_composite)>();
  return op.call(weight, gamma, beta, eps);
}

}  // namespace matterhorn::ops

TORCH_LIBRARY_FRAGMENT(matterhorn, m) {
  m.def("weight_standardize(Tensor weight, Tensor? gamma=None, Tensor? beta=None, float eps=1e-06) -> Tensor");
  m.def(
      "weight_standardize_forward(Tensor weight, Tensor? gamma, Tensor? beta, float eps) "
      "-> (Tensor output, Tensor mean, Tensor rstd)");
  m.def(
      "weight_standardize_backward(Tensor grad_output, Tensor weight, Tensor mean, Tensor rstd, Tensor? gamma) "
      "-> (Tensor grad_weight, Tensor grad_gamma, Tensor grad_beta)");
}

TORCH_LIBRARY_IMPL(matterhorn, CompositeImplicitAutograd, m) {
  m.impl("weight_standardize", &matterhorn::ops::weight_standardize_composite);
}

// A building block without a derivative (weight_standardize_forward has one): a backward through
// it raises, where torch's default would warn and give no gradient.
TORCH_LIBRARY_IMPL(matterhorn, Autograd, m) {
  m.impl("weight_standardize_backward", torch::autograd::autogradNotImplementedFallback());
}
