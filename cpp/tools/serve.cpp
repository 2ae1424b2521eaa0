// matterhorn_serve MODEL [--port N] [--threads N] [--max-bytes N]
//
// An inference server embedding matterhorn: loads a TorchScript (.pt) or AOTInductor (.pt2)
// model and serves it over HTTP on loopback with cpp-httplib, on a pool of threads sharing the
// one loaded model (each request under c10::InferenceMode).
//
//   GET  /health  -> 200 {"status": "ok", ...}
//   POST /infer   -> body: raw little-endian float32 values; header X-Shape: 4,3,784 (sizes)
//                    200: the output the same way (X-Shape, X-Dtype: float32 headers)
//                    4xx with a one-line message for a malformed or unfitting request
//
// --port 0 (the default) picks a free port; the first line printed is "listening on HOST:PORT".
#include <cstdio>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <httplib.h>

#include "matterhorn/version.h"
#include "model.h"

namespace {

// The first line of an error, without torch's backtrace.
std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// What the model said about an input it rejected. The TorchScript interpreter wraps the op's
// message ("Conv2d(in_channels=2): expected ...") in a traceback and puts it on the last line.
std::string model_error(const std::string& text) {
  if (text.find("TorchScript interpreter") == std::string::npos) return first_line(text);
  std::string last, line;
  std::stringstream stream(text);
  while (std::getline(stream, line)) {
    if (!line.empty()) last = line;
  }
  const size_t colon = last.find("Error: ");
  return colon == std::string::npos ? last : last.substr(colon + 7);
}

// A request that cannot be served: its HTTP status and the message sent back.
struct Rejection {
  int status;
  std::string message;
};

std::vector<int64_t> parse_shape(const std::string& header) {
  if (header.empty()) throw Rejection{400, "missing X-Shape header: the input's sizes, e.g. X-Shape: 4,3,784"};
  std::vector<int64_t> sizes;
  std::stringstream stream(header);
  std::string item;
  while (std::getline(stream, item, ',')) {
    size_t used = 0;
    long long size = -1;
    try {
      size = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size() || size < 0 || size > (1LL << 40)) {
      throw Rejection{400, "X-Shape must be comma-separated non-negative sizes, got '" + header + "'"};
    }
    sizes.push_back(size);
  }
  if (sizes.empty() || sizes.size() > 8) throw Rejection{400, "X-Shape must hold 1 to 8 sizes, got '" + header + "'"};
  return sizes;
}

std::string shape_header(at::IntArrayRef sizes) {
  std::string text;
  for (const int64_t size : sizes) text += (text.empty() ? "" : ",") + std::to_string(size);
  return text;
}

at::Tensor parse_input(const httplib::Request& request) {
  const std::string dtype = request.get_header_value("X-Dtype");
  if (!dtype.empty() && dtype != "float32") {
    throw Rejection{415, "X-Dtype must be float32, got '" + dtype + "'"};
  }
  const std::vector<int64_t> sizes = parse_shape(request.get_header_value("X-Shape"));
  int64_t numel = 1;
  for (const int64_t size : sizes) {
    if (size != 0 && numel > (int64_t{1} << 40) / size) throw Rejection{413, "X-Shape is too large"};
    numel *= size;
  }
  const int64_t expected = numel * static_cast<int64_t>(sizeof(float));
  if (static_cast<int64_t>(request.body.size()) != expected) {
    throw Rejection{400, "the body has " + std::to_string(request.body.size()) + " bytes but X-Shape " +
                             request.get_header_value("X-Shape") + " of float32 needs " + std::to_string(expected)};
  }
  at::Tensor input = at::empty(sizes, at::kFloat);
  std::memcpy(input.data_ptr<float>(), request.body.data(), request.body.size());
  return input;
}

void reply_error(httplib::Response& response, int status, const std::string& message) {
  std::string quoted;
  for (const char c : message) quoted += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
  response.status = status;
  response.set_content("{\"error\": \"" + quoted + "\"}\n", "application/json");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc % 2 != 0) {
    std::fprintf(stderr, "usage: %s MODEL [--port N] [--threads N] [--max-bytes N]\n", argv[0]);
    return 2;
  }
  const std::string path = argv[1];
  int port = 0, threads = 8;
  size_t max_bytes = 64 << 20;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string option = argv[i];
    if (option == "--port") {
      port = std::atoi(argv[i + 1]);
    } else if (option == "--threads") {
      threads = std::atoi(argv[i + 1]);
    } else if (option == "--max-bytes") {
      max_bytes = std::strtoull(argv[i + 1], nullptr, 10);
    } else {
      std::fprintf(stderr, "matterhorn_serve: unknown option %s\n", option.c_str());
      return 2;
    }
  }

  std::unique_ptr<matterhorn::tools::Model> model;
  try {
    model = std::make_unique<matterhorn::tools::Model>(path);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "matterhorn_serve: cannot load %s: %s\n", path.c_str(), first_line(error.what()).c_str());
    return 1;
  }

  httplib::Server server;
  server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server.set_payload_max_length(max_bytes);  // larger bodies: 413 before they are read

  server.Get("/health", [&](const httplib::Request&, httplib::Response& response) {
    response.set_content("{\"status\": \"ok\", \"model\": \"" + path + "\", \"matterhorn\": \"" +
                             matterhorn::version() + "\"}\n",
                         "application/json");
  });

  server.Post("/infer", [&](const httplib::Request& request, httplib::Response& response) {
    at::Tensor input, output;
    try {
      input = parse_input(request);
    } catch (const Rejection& rejection) {
      return reply_error(response, rejection.status, rejection.message);
    }
    try {
      output = (*model)(input).to(at::kFloat).contiguous();
    } catch (const std::exception& error) {  // the model's own checks: the input does not fit it
      return reply_error(response, 422, model_error(error.what()));
    }
    response.set_header("X-Shape", shape_header(output.sizes()));
    response.set_header("X-Dtype", "float32");
    response.set_content(
        std::string(static_cast<const char*>(output.const_data_ptr()), output.numel() * sizeof(float)),
        "application/octet-stream");
  });

  // Statuses httplib sets itself (404, 413, ...) get a message too.
  server.set_error_handler([](const httplib::Request& request, httplib::Response& response) {
    if (response.body.empty()) {
      reply_error(response, response.status,
                  response.status == 413 ? "the request body is larger than the server accepts"
                                         : "no such endpoint: " + request.method + " " + request.path);
    }
  });

  const int bound = port == 0 ? server.bind_to_any_port("127.0.0.1") : (server.bind_to_port("127.0.0.1", port) ? port : -1);
  if (bound < 0) {
    std::fprintf(stderr, "matterhorn_serve: cannot listen on 127.0.0.1:%d\n", port);
    return 1;
  }
  std::printf("listening on 127.0.0.1:%d\n", bound);
  std::fflush(stdout);
  return server.listen_after_bind() ? 0 : 1;
}
