// BatchNorm's CUDA kernels and launch sequences (cpp/src/ops/cuda/batch_norm_kernel.cuh), run on
// the CPU by cuda_on_cpu.h, as ops torch.ops.matterhorn_emulated.* with one more argument: the
// number of multiprocessors the grids are planned for. Built by tests/test_cuda_emulation.py.
// While an op runs, fresh CPU memory is NaN and fenced: an unwritten output element stays NaN,
// and a write past either end of an allocation is counted (overruns()).
#include "cuda_on_cpu.h"  // first: the kernels' CUDA words

#include <atomic>
#include <cstring>
#include <utility>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include "ops/cuda/batch_norm_kernel.cuh"

namespace {

namespace bn = matterhorn::ops::cuda;

constexpr size_t kGuardBytes = 64;
constexpr unsigned char kGuard = 0xA5;
std::atomic<int64_t> overrun_count{0};

class PoisonAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    auto* block = new Block{real->allocate(n + 2 * kGuardBytes), n};
    auto* base = static_cast<unsigned char*>(block->memory.get());
    std::memset(base, kGuard, kGuardBytes);
    std::memset(base + kGuardBytes, 0xFF, n);  // NaN in every floating-point type
    std::memset(base + kGuardBytes + n, kGuard, kGuardBytes);
    return {base + kGuardBytes, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  c10::Allocator* real = nullptr;

 private:
  struct Block {
    c10::DataPtr memory;
    size_t size;
  };
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    const auto* base = static_cast<const unsigned char*>(block->memory.get());
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (base[i] != kGuard || base[kGuardBytes + block->size + i] != kGuard) {
        ++overrun_count;
        break;
      }
    }
    delete block;
  }
};

PoisonAllocator poison;

// The poisoning allocator for the scope of one op.
struct Poisoned {
  c10::Allocator* previous = c10::GetCPUAllocator();
  Poisoned() {
    poison.real = previous;
    c10::SetCPUAllocator(&poison);
  }
  ~Poisoned() { c10::SetCPUAllocator(previous); }
};

struct EmulatedLaunch {
  int64_t count;
  int64_t multiprocessors() const { return count; }
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) const {
    cuda_on_cpu::emulate(kernel, grid, block, std::forward<Args>(args)...);
  }
};

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input, int64_t groups, int64_t multiprocessors) {
  Poisoned poisoned;
  return bn::launch_stats(input, groups, EmulatedLaunch{multiprocessors});
}

at::Tensor elemt(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                 int64_t groups, int64_t multiprocessors, const std::optional<at::Tensor>& scale) {
  Poisoned poisoned;
  return bn::launch_elemt(input, mean, var, weight, bias, eps, groups, scale, EmulatedLaunch{multiprocessors});
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                                   const at::Tensor& mean, int64_t groups, int64_t multiprocessors) {
  Poisoned poisoned;
  return bn::launch_backward_reduce(grad_output, input, mean, groups, EmulatedLaunch{multiprocessors});
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& var, const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, double eps, int64_t count, int64_t groups,
                          int64_t multiprocessors, const std::optional<at::Tensor>& scale) {
  Poisoned poisoned;
  return bn::launch_backward_elemt(grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, eps, count, groups,
                                   scale, EmulatedLaunch{multiprocessors});
}

void update_stats(const at::Tensor& mean, const at::Tensor& var, int64_t count, const at::Tensor& running_mean,
                  const at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked,
                  std::optional<double> momentum) {
  Poisoned poisoned;
  bn::launch_update_stats(mean, var, count, running_mean, running_var, num_batches_tracked, momentum,
                          EmulatedLaunch{1});
}

// The grid a launch would get, for checks of the plan itself: (grid x, y, z, lanes, splits).
std::vector<int64_t> tiling(const at::Tensor& input, int64_t groups, int64_t vec, int64_t multiprocessors) {
  auto [x, layout] = matterhorn::ops::detail::batch_norm_layout(input, groups);
  const bn::Tiling t = bn::plan_tiling(layout, static_cast<int>(vec), multiprocessors);
  return {t.grid_x, t.grid_y, t.grid_z, t.lanes, t.splits};
}

int64_t overruns() { return overrun_count.load(); }

// Bytes loaded and stored by the kernels' vector accesses since the last call, and the number of
// loads and stores; then zeroes them.
std::vector<int64_t> take_traffic() {
  cuda_on_cpu::Traffic& t = cuda_on_cpu::traffic;
  std::vector<int64_t> counts{t.loaded, t.stored, t.loads, t.stores};
  t.loaded = t.stored = t.loads = t.stores = 0;
  return counts;
}

// Starts recording the addresses of the kernels' loads; take_load_addresses() returns them in the
// order they ran and stops.
void trace_loads() { cuda_on_cpu::traffic.trace_loads = true; }

std::vector<int64_t> take_load_addresses() {
  cuda_on_cpu::traffic.trace_loads = false;
  return std::exchange(cuda_on_cpu::traffic.load_addresses, {});
}

}  // namespace

TORCH_LIBRARY(matterhorn_emulated, m) {
  m.def("batch_norm_stats(Tensor input, int groups, int multiprocessors) -> (Tensor, Tensor)");
  m.def("batch_norm_elemt(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
        "int groups, int multiprocessors, Tensor? scale=None) -> Tensor");
  m.def("batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, int groups, "
        "int multiprocessors) -> (Tensor, Tensor)");
  m.def("batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
        "Tensor sum_dy, Tensor sum_dy_xmu, float eps, int count, int groups, int multiprocessors, "
        "Tensor? scale=None) -> Tensor");
  m.def("batch_norm_update_stats(Tensor mean, Tensor var, int count, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float? momentum) -> ()");
  m.def("tiling(Tensor input, int groups, int vec, int multiprocessors) -> int[]");
  m.def("overruns() -> int");
  m.def("take_traffic() -> int[]");
  m.def("trace_loads() -> ()");
  m.def("take_load_addresses() -> int[]");
  m.impl("batch_norm_stats", c10::DispatchKey::CPU, &stats);
  m.impl("batch_norm_elemt", c10::DispatchKey::CPU, &elemt);
  m.impl("batch_norm_backward_reduce", c10::DispatchKey::CPU, &backward_reduce);
  m.impl("batch_norm_backward_elemt", c10::DispatchKey::CPU, &backward_elemt);
  m.impl("batch_norm_update_stats", c10::DispatchKey::CPU, &update_stats);
  m.impl("tiling", c10::DispatchKey::CPU, &tiling);
  m.impl("tiling", c10::DispatchKey::Meta, &tiling);
  m.impl("overruns", &overruns);
  m.impl("take_traffic", &take_traffic);
  m.impl("trace_loads", &trace_loads);
  m.impl("take_load_addresses", &take_load_addresses);
}
