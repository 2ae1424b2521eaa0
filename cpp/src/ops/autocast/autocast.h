#pragma once
// Autocast kernels for our ops, built from ATen's own autocast wrapper: cast floating tensors to
// the autocast dtype of the device (bfloat16 on CPU, float16 or bfloat16 on CUDA), then call the
// op again below the autocast key, as torch does for its convolutions and matmuls.
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

// The AutocastCPU / AutocastCUDA kernel of op `name` whose schema has C++ signature `Signature`.
template <c10::DeviceType device, const char* name, typename Signature>
constexpr auto lower_precision_kernel = &at::autocast::WrapFunction_<
    at::autocast::CastPolicy::lower_precision_fp, device, Signature,
    &DispatcherCall<name, Signature>::call, typename ArgumentsOf<Signature>::ret,
    typename ArgumentsOf<Signature>::list>::call;

}  // namespace matterhorn::ops::detail
