// CUDA kernels of the BatchNorm building blocks (see ops/batch_norm.h), beside the CPU ones in
// ops/cpu/batch_norm_kernel.cpp. The kernels and launch sequences are in batch_norm_kernel.cuh
// (shared with the CPU emulation of tests/emulation); here they meet the stream and the device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/batch_norm_kernel.cuh"

namespace matterhorn::ops::cuda {
namespace {

// Launches on the current stream of the guarded device, checking each launch.
struct CudaLaunch {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t multiprocessors() const {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
    return count;
  }
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& input, int64_t groups) {
  const c10::cuda::CUDAGuard guard(input.device());
  return launch_stats(input, groups, CudaLaunch{});
}

at::Tensor elemt_cuda(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t groups, const std::optional<at::Tensor>& scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  return launch_elemt(input, mean, var, weight, bias, eps, groups, scale, CudaLaunch{});
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, int64_t groups) {
  const c10::cuda::CUDAGuard guard(input.device());
  return launch_backward_reduce(grad_output, input, mean, groups, CudaLaunch{});
}

at::Tensor backward_elemt_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, double eps,
    c10::SymInt count, int64_t groups, const std::optional<at::Tensor>& scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  return launch_backward_elemt(grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, eps, count.expect_int(),
                               groups, scale, CudaLaunch{});
}

void update_stats_cuda(
    const at::Tensor& mean, const at::Tensor& var, c10::SymInt count, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum) {
  const c10::cuda::CUDAGuard guard(running_mean.device());
  launch_update_stats(mean, var, count.expect_int(), running_mean, running_var, num_batches_tracked, momentum,
                      CudaLaunch{});
}

}  // namespace
}  // namespace matterhorn::ops::cuda

TORCH_LIBRARY_IMPL(matterhorn, CUDA, m) {
  m.impl("batch_norm_stats", &matterhorn::ops::cuda::stats_cuda);
  m.impl("batch_norm_elemt", &matterhorn::ops::cuda::elemt_cuda);
  m.impl("batch_norm_backward_reduce", &matterhorn::ops::cuda::backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &matterhorn::ops::cuda::backward_elemt_cuda);
  m.impl("batch_norm_update_stats", &matterhorn::ops::cuda::update_stats_cuda);
}
