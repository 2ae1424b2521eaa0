#pragma once
// Runs CUDA kernel source on the CPU, for tests on machines without a GPU: include this before a
// .cuh of kernels and launch them with `emulate(kernel, grid, block, args...)`. Blocks run one
// after another; a block's threads are fibers (ucontext) on one CPU thread, switched at
// __syncthreads(), so shared memory (`static` here) and barriers behave as on the GPU, and a
// missing barrier shows up as a wrong result (threads run in order, each up to its next barrier).
// Checks what the hardware would refuse: block and grid limits, a barrier that not every thread
// of the block reaches.
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define MATTERHORN_TRACE_ACCESS(address, bytes, is_store) cuda_on_cpu::trace_access(address, bytes, is_store)

namespace cuda_on_cpu {

// Bytes and instructions of the kernels' vector loads and stores, and, while `trace_loads` is set,
// the loads' addresses in the order they ran (MATTERHORN_TRACE_ACCESS).
struct Traffic {
  int64_t loaded = 0, stored = 0, loads = 0, stores = 0;
  bool trace_loads = false;
  std::vector<int64_t> load_addresses;
};
inline Traffic traffic;

inline void trace_access(const void* address, int64_t bytes, bool is_store) {
  (is_store ? traffic.stored : traffic.loaded) += bytes;
  ++(is_store ? traffic.stores : traffic.loads);
  if (!is_store && traffic.trace_loads) traffic.load_addresses.push_back(reinterpret_cast<int64_t>(address));
}

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool finished = false;
};

constexpr size_t kStackBytes = 128 << 10;
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline size_t running = 0;
inline const std::function<void()>* body = nullptr;

inline void fiber_main() {
  (*body)();
  fibers[running].finished = true;  // uc_link returns to the scheduler
}

// Back to the scheduler; it resumes this fiber once every thread of the block has arrived.
inline void barrier() { swapcontext(&fibers[running].context, &scheduler); }

inline void run_block(const std::function<void()>& kernel) {
  const size_t threads = size_t(blockDim.x) * blockDim.y * blockDim.z;
  if (fibers.size() < threads) fibers.resize(threads);
  body = &kernel;
  for (size_t i = 0; i < threads; ++i) {
    Fiber& f = fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.finished = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (;;) {  // one round: every live thread runs to its next barrier
    size_t finished = 0;
    for (size_t i = 0; i < threads; ++i) {
      if (fibers[i].finished) {
        ++finished;
        continue;
      }
      running = i;
      threadIdx = dim3(i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (size_t(blockDim.x) * blockDim.y));
      swapcontext(&scheduler, &fibers[i].context);
      if (fibers[i].finished) ++finished;
    }
    if (finished == threads) return;
    if (finished != 0) {
      throw std::runtime_error("cuda_on_cpu: __syncthreads() reached by only some threads of a block");
    }
  }
}

}  // namespace cuda_on_cpu

using cuda_on_cpu::blockDim;
using cuda_on_cpu::blockIdx;
using cuda_on_cpu::gridDim;
using cuda_on_cpu::threadIdx;

inline void __syncthreads() { cuda_on_cpu::barrier(); }

namespace cuda_on_cpu {

// kernel<<<grid, block>>>(args...), on the CPU.
template <typename... Params, typename... Args>
void emulate(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) throw std::runtime_error("cuda_on_cpu: invalid block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("cuda_on_cpu: invalid grid " + std::to_string(grid.x) + " x " + std::to_string(grid.y) +
                             " x " + std::to_string(grid.z));
  }
  const std::function<void()> call = [&] { kernel(args...); };
  gridDim = grid, blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(call);
      }
}

}  // namespace cuda_on_cpu
