// matterhorn_run_model MODEL INPUT.pt [OUTPUT.pt]
// matterhorn_run_model --threads N --seconds S MODEL INPUT.pt
//
// Loads a model saved from Python (a TorchScript .pt or an AOTInductor .pt2, see model.h) in a
// program with no Python, runs it on a tensor saved with torch.save, prints a one-line summary of
// the output and, if asked, saves the output for torch.load. With --threads, N threads run the
// one loaded model concurrently for S seconds and every output must equal the single-threaded one.
//
// The input is read with matterhorn::load_tensor, which checks its record before anything reads
// it. Exit status: 0 done, 1 an error (model, input or output file; the message says which),
// 2 a usage error.
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include "matterhorn/serialize.h"
#include "matterhorn/version.h"
#include "model.h"

namespace {

using matterhorn::tools::Model;

const char* kUsage =
    "usage: matterhorn_run_model MODEL.pt|MODEL.pt2 INPUT.pt [OUTPUT.pt]\n"
    "       matterhorn_run_model --threads N --seconds S MODEL INPUT.pt\n";

// Writes `output` for torch.load. Every step is checked: an unwritable path or a full disk is an
// error, not a missing file discovered later.
void save_output(const at::Tensor& output, const std::string& path) {
  const std::vector<char> bytes = torch::jit::pickle_save(output);
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  TORCH_CHECK(stream, "cannot write the output to '", path, "': ", std::strerror(errno));
  stream.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  stream.flush();
  const int write_errno = errno;
  const bool written = static_cast<bool>(stream);
  stream.close();
  TORCH_CHECK(written && !stream.fail(), "cannot write the output to '", path, "': ",
              std::strerror(written ? errno : write_errno), " (the file is incomplete)");
}

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

// A whole argument as a number in [low, high], or nothing.
std::optional<double> number(const char* text, double low, double high) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text, &end);
  if (end == text || *end != '\0' || errno != 0 || !(value >= low && value <= high)) return std::nullopt;
  return value;
}

// The message of an error, without torch's C++ backtrace.
std::string message(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  return c10_error ? c10_error->what_without_backtrace() : error.what();
}

int run(int argc, char** argv) {
  if (std::strcmp(argv[1], "--threads") == 0) {
    const auto threads = number(argv[2], 1, 1024);
    const auto seconds = number(argv[4], 0, 86400);
    if (!threads || *threads != static_cast<int>(*threads) || !seconds) {
      std::cerr << "matterhorn_run_model: --threads takes a whole number from 1 to 1024 and --seconds a number from "
                   "0 to 86400\n"
                << kUsage;
      return 2;
    }
    Model model(argv[5]);
    const at::Tensor input = matterhorn::load_tensor(argv[6]);
    return stress(model, input, static_cast<int>(*threads), *seconds) == 0 ? 0 : 1;
  }
  Model model(argv[1]);
  const at::Tensor input = matterhorn::load_tensor(argv[2]);
  const at::Tensor output = model(input);
  // The same line the Python demo prints, so the two can be compared by eye.
  const at::Tensor flat = output.to(at::kDouble).flatten();
  std::printf("matterhorn %s C++: output %s sum=%.6f first=[", matterhorn::version().c_str(),
              c10::str(output.sizes()).c_str(), flat.sum().item<double>());
  for (int64_t i = 0; i < std::min<int64_t>(4, flat.numel()); ++i) {
    std::printf("%s%.6f", i ? ", " : "", flat[i].item<double>());
  }
  std::printf("]\n");
  std::fflush(stdout);
  if (argc == 4) save_output(output, argv[3]);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
    std::cout << kUsage;
    return 0;
  }
  const bool stress_mode = argc > 1 && std::strcmp(argv[1], "--threads") == 0;
  if (stress_mode ? argc != 7 || std::strcmp(argv[3], "--seconds") != 0 : argc < 3 || argc > 4) {
    std::cerr << kUsage;
    return 2;
  }
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::cerr << "matterhorn_run_model: " << message(error) << "\n";
    return 1;
  }
}
