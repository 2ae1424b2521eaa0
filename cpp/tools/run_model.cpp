// matterhorn_run_model MODEL.pt INPUT.pt [OUTPUT.pt]
//
// Loads a TorchScript file saved from Python (torch.jit.save) in a program with no Python,
// runs it on a tensor saved with torch.save, prints a one-line summary of the output and, if
// asked, saves the output for torch.load.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

#include <torch/csrc/jit/serialization/import.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include "matterhorn/version.h"

namespace {

std::vector<char> read_file(const char* path) {
  std::ifstream stream(path, std::ios::binary);
  TORCH_CHECK(stream, "cannot open ", path);
  return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt INPUT.pt [OUTPUT.pt]\n";
    return 2;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    model.eval();
    const at::Tensor input = torch::jit::pickle_load(read_file(argv[2])).toTensor();
    at::Tensor output;
    {
      c10::InferenceMode inference;
      output = model.forward({input}).toTensor();
    }
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
