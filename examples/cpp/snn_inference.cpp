// Builds the network of net.py with matterhorn's C++ API, loads the weights Python saved with
// mth.save_state_dict (torch.save of a plain {name: tensor} dict), and runs a spike train saved
// with torch.save.
//
//   snn_inference WEIGHTS.pt INPUT.pt OUTPUT.pt
#include <fstream>
#include <iostream>
#include <vector>

#include <matterhorn/matterhorn.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/nn/module.h>

namespace snn = matterhorn::snn;

// The C++ twin of net.py's Net: [T, B, 2, 8, 8] spikes -> [T, B, 10].
struct NetImpl : torch::nn::Module {
  NetImpl()
      : conv(register_module("conv", snn::Conv2d(snn::Conv2dOptions(2, 8, 3).padding(1)))),
        bn(register_module("bn", snn::BatchNorm2d(8))),
        fc(register_module("fc", snn::Linear(8 * 8 * 8, 10))) {}

  at::Tensor forward(const at::Tensor& spikes) { return fc(bn(conv(spikes)).relu().flatten(2)); }

  snn::Conv2d conv;
  snn::BatchNorm2d bn;
  snn::Linear fc;
};
TORCH_MODULE(Net);

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " WEIGHTS.pt INPUT.pt OUTPUT.pt\n";
    return 2;
  }
  try {
    Net net;
    matterhorn::load_state_dict(*net, argv[1]);
    net->eval();
    const at::Tensor spikes = matterhorn::load_tensor(argv[2]);  // its record checked before it is read
    at::Tensor output;
    {
      c10::InferenceMode inference;
      output = net->forward(spikes);
    }
    const std::vector<char> bytes = torch::jit::pickle_save(output);
    std::ofstream stream(argv[3], std::ios::binary | std::ios::trunc);
    stream.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    stream.close();
    TORCH_CHECK(!stream.fail(), "cannot write '", argv[3], "'");
    std::cout << "matterhorn " << matterhorn::version() << ": " << spikes.sizes() << " -> " << output.sizes() << "\n";
  } catch (const std::exception& error) {
    std::cerr << "snn_inference: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
