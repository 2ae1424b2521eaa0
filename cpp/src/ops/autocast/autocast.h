#pragma once
// Autocast kernels for our ops, built from ATen's own autocast wrapper: cast floating tensors to
// the autocast dtype of the device (bfloat16 on CPU, float16 or bfloat16 on CUDA) or to float32,
// then call the op again below the autocast key, as torch does for its own ops.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace matterhorn::ops::detail {

// Calls the op `name` through the dispatcher with the C++ signature of its schema.
template <const char* name, typename Signature>
struct DispatcherCall;

template <const char* name, typename Ret, typename... Args>
struct DispatcherCall<name, Ret(Args...)> {
  static Ret call(Args... args) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Ret(Args...)>();
    return op.call(args...);
  }
};

template <typename Signature>
struct ArgumentsOf;

template <typename Ret, typename... Args>
struct ArgumentsOf<Ret(Args...)> {
  using ret = Ret;
  using list = c10::guts::typelist::typelist<Args...>;
};

// The AutocastCPU / AutocastCUDA kernel of op `name` whose schema has C++ signature `Signature`,
// casting as `policy` says.
template <at::autocast::CastPolicy policy, c10::DeviceType device, const char* name, typename Signature>
constexpr auto autocast_kernel = &at::autocast::WrapFunction_<
    policy, device, Signature, &DispatcherCall<name, Signature>::call, typename ArgumentsOf<Signature>::ret,
    typename ArgumentsOf<Signature>::list>::call;

// Compute in the autocast dtype (convolutions, matmuls).
template <c10::DeviceType device, const char* name, typename Signature>
constexpr auto lower_precision_kernel =
    autocast_kernel<at::autocast::CastPolicy::lower_precision_fp, device, name, Signature>;

// Compute in float32 (normalizations).
template <c10::DeviceType device, const char* name, typename Signature>
constexpr auto fp32_kernel = autocast_kernel<at::autocast::CastPolicy::fp32, device, name, Signature>;

}  // namespace matterhorn::ops::detail
