// The spike pack / unpack CUDA kernels and launch sequences (cpp/src/ops/cuda/spike_pack_kernel.cuh),
// run on the CPU by cuda_on_cpu.h, as ops torch.ops.matterhorn_spike_emulated.*. Built by
// tests/test_spike_input.py. As on the GPU, pack only sets the flag; unpack reads it.
#include "cuda_on_cpu.h"  // first: the kernels' CUDA words

#include <torch/library.h>

#include "ops/cuda/spike_pack_kernel.cuh"

namespace {

namespace spikes = matterhorn::ops::cuda::spikes;

struct EmulatedLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    cuda_on_cpu::emulate(kernel, grid, block, std::forward<Args>(args)...);
  }
};

std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& input) {
  return spikes::launch_pack(input, "pack_spikes", EmulatedLaunch{});
}

at::Tensor unpack(const at::Tensor& bits, const std::optional<at::Tensor>& invalid, c10::SymIntArrayRef size,
                  c10::SymIntArrayRef stride, at::ScalarType dtype) {
  return spikes::launch_unpack(bits, invalid, size, stride, dtype, "unpack_spikes", EmulatedLaunch{},
                               [](const at::Tensor& flag) { return flag.item<uint8_t>(); });
}

// Bytes loaded and stored by the kernels' vector accesses since the last call; then zeroes them.
std::vector<int64_t> take_traffic() {
  cuda_on_cpu::Traffic& t = cuda_on_cpu::traffic;
  std::vector<int64_t> counts{t.loaded, t.stored};
  t.loaded = t.stored = t.loads = t.stores = 0;
  return counts;
}

}  // namespace

TORCH_LIBRARY(matterhorn_spike_emulated, m) {
  m.def("pack_spikes(Tensor input) -> (Tensor, Tensor)");
  m.def("unpack_spikes(Tensor bits, Tensor? invalid, SymInt[] size, SymInt[] stride, ScalarType dtype) -> Tensor");
  m.def("take_traffic() -> int[]");
  m.impl("pack_spikes", c10::DispatchKey::CPU, &pack);
  m.impl("unpack_spikes", c10::DispatchKey::CPU, &unpack);
  m.impl("take_traffic", &take_traffic);
}
