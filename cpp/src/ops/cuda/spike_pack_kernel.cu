// CUDA kernels of pack_spikes / unpack_spikes. The kernels and launch sequences are in
// spike_pack_kernel.cuh (shared with the CPU emulation of tests/emulation); here they meet the
// stream and the device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/spike_pack_kernel.cuh"

namespace {

namespace spikes = matterhorn::ops::cuda::spikes;

// Launches on the current stream of the guarded device, checking each launch.
struct CudaLaunch {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& input, c10::string_view layer) {
  const c10::cuda::CUDAGuard guard(input.device());
  return spikes::launch_pack(input, layer, CudaLaunch{});
}

at::Tensor unpack_cuda(
    const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
    c10::SymIntArrayRef stride, at::ScalarType dtype, c10::string_view layer) {
  const c10::cuda::CUDAGuard guard(bits.device());
  return spikes::launch_unpack(bits, invalid, size, stride, dtype, layer, CudaLaunch{},
                               [](const at::Tensor& flag) { return flag.item<uint8_t>(); });
}

}  // namespace

TORCH_LIBRARY_IMPL(matterhorn, CUDA, m) {
  m.impl("pack_spikes", &pack_cuda);
  m.impl("unpack_spikes", &unpack_cuda);
}
