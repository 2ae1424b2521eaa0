// matterhorn_run_model MODEL INPUT.pt [OUTPUT.pt]
// matterhorn_run_model --threads N --seconds S MODEL INPUT.pt
//
// Loads a model saved from Python (a TorchScript .pt or an AOTInductor .pt2, see model.h) in a
// program with no Python, runs it on a tensor saved with torch.save, prints a one-line summary of the output and, if
// asked, saves the output for torch.load. With --threads, N threads run the one loaded model
// concurrently for S seconds and every output must equal the single-threaded one.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <thread>
#include <vector>

#include <torch/csrc/jit/serialization/pickle.h>

#include "matterhorn/version.h"
#include "model.h"

namespace {

std::vector<char> read_file(const char* path) {
  std::ifstream stream(path, std::ios::binary);
  TORCH_CHECK(stream, "cannot open ", path);
  return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
}

using matterhorn::tools::Model;

// N threads share one loaded model for `seconds`; returns how many outputs differed.
int stress(Model& model, const at::Tensor& input, int threads, double seconds) {
  const at::Tensor expected = model(input);
  std::atomic<int64_t> runs{0}, mismatches{0};
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> workers;
  for (int i = 0; i < threads; ++i) {
    workers.emplace_back([&] {
      while (std::chrono::steady_clock::now() < deadline) {
        if (!model(input).equal(expected)) ++mismatches;
        ++runs;
      }
    });
  }
  for (auto& worker : workers) worker.join();
  std::printf("matterhorn %s C++: %d threads, %lld runs, %lld mismatches\n", matterhorn::version().c_str(),
              threads, static_cast<long long>(runs.load()), static_cast<long long>(mismatches.load()));
  return static_cast<int>(mismatches.load());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 7 && std::strcmp(argv[1], "--threads") == 0 && std::strcmp(argv[3], "--seconds") == 0) {
    try {
      Model model(argv[5]);
      const at::Tensor input = torch::jit::pickle_load(read_file(argv[6])).toTensor();
      return stress(model, input, std::atoi(argv[2]), std::atof(argv[4])) == 0 ? 0 : 1;
    } catch (const std::exception& error) {
      std::cerr << "matterhorn_run_model: " << error.what() << "\n";
      return 1;
    }
  }
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt|MODEL.pt2 INPUT.pt [OUTPUT.pt]\n"
              << "       " << argv[0] << " --threads N --seconds S MODEL INPUT.pt\n";
    return 2;
  }
  try {
    Model model(argv[1]);
    const at::Tensor input = torch::jit::pickle_load(read_file(argv[2])).toTensor();
    const at::Tensor output = model(input);
    // The same line the Python demo prints, so the two can be compared by eye.
    const at::Tensor flat = output.to(at::kDouble).flatten();
    std::printf("matterhorn %s C++: output %s sum=%.6f first=[", matterhorn::version().c_str(),
                c10::str(output.sizes()).c_str(), flat.sum().item<double>());
    for (int64_t i = 0; i < std::min<int64_t>(4, flat.numel()); ++i) {
      std::printf("%s%.6f", i ? ", " : "", flat[i].item<double>());
    }
    std::printf("]\n");
    if (argc == 4) {
      const std::vector<char> bytes = torch::jit::pickle_save(output);
      std::ofstream(argv[3], std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
  } catch (const std::exception& error) {
    std::cerr << "matterhorn_run_model: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
