// matterhorn_serve MODEL [--port N] [--threads N] [--max-bytes N] [--timeout S] [--max-connections N]
//
// An inference server embedding matterhorn: loads a TorchScript (.pt) or AOTInductor (.pt2)
// model and serves it over HTTP/1.1 on loopback. Connections are handled asynchronously by
// Boost.Beast on two I/O threads; inference runs on a separate pool of --threads workers sharing
// the one loaded model (each request under c10::InferenceMode), so slow, idle or hostile clients
// hold no worker and /health is answered on the I/O threads without waiting behind inference.
//
//   GET  /health  -> 200 {"status": "ok", "model": ..., "matterhorn": ..., "threads": N}
//   POST /infer   -> body: raw little-endian float32 values; header X-Shape: 4,3,784 (the sizes,
//                    at most 8), optional X-Dtype: float32
//                    200: the output the same way (X-Shape, X-Dtype: float32 headers)
//
// Every other answer is a JSON object {"error": "<one line in the client's terms>"} that carries
// no server internals (no C++ exception text, no backtrace, no file names of the server):
//   400  malformed HTTP, a missing or malformed X-Shape, a body whose size does not match X-Shape,
//        an X-Shape larger than --max-bytes allows even with a zero size in it
//   404  no such endpoint                405  wrong method for /health or /infer (Allow header)
//   413  a body over --max-bytes, chunked or not (the connection is closed)
//   415  an X-Dtype other than float32; a compressed body (Content-Encoding other than identity,
//        or a Transfer-Encoding other than chunked): bodies are never inflated
//   417  an Expect other than 100-continue    431  request headers over 16 KiB
//   422  the model rejected the input (the layer's message, e.g. "Conv2d(in_channels=2): ...")
//   500  an unexpected failure inside the server (details go to the server's stderr only)
//   503  not enough memory to run the model on this input
// A connection must deliver a whole request (headers and body) within --timeout seconds of being
// ready for it, idle keep-alive time included; otherwise it is closed. Connections beyond
// --max-connections are closed at once. Worst-case memory: --max-connections x --max-bytes.
//
// --port 0 (the default) picks a free port; the first line printed is "listening on HOST:PORT".
// SIGINT / SIGTERM stop the server (exit status 0). Exit status 1: the model or the port cannot be
// used; 2: invalid options.
#include <algorithm>
#include <sys/resource.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "matterhorn/version.h"
#include "model.h"

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

constexpr const char* kUsage =
    "usage: matterhorn_serve MODEL [--port N] [--threads N] [--max-bytes N] [--timeout S] [--max-connections N]\n"
    "  MODEL               a TorchScript file (.pt) or an AOTInductor package (.pt2)\n"
    "  --port N            TCP port on 127.0.0.1, 0 to 65535; 0 (default) picks a free one\n"
    "  --threads N         inference threads, 1 to 256 (default 8)\n"
    "  --max-bytes N       largest request body in bytes, 1 to 2^40 (default 67108864)\n"
    "  --timeout S         seconds a connection has to deliver a whole request, 0.1 to 3600 (default 10)\n"
    "  --max-connections N open connections at most, 1 to 65536 (default 512)\n";
constexpr int kIoThreads = 2;
constexpr uint32_t kHeaderLimit = 16 * 1024;
constexpr size_t kMaxRank = 8;
// After an error that leaves a request body unread, the rest of it is read and dropped for a
// short while before closing, so that the client sees the answer rather than a connection reset.
constexpr auto kDrainTime = std::chrono::seconds(2);
constexpr uint64_t kDrainBytes = 16 << 20;

struct Options {
  std::string model;
  int port = 0;
  int threads = 8;
  uint64_t max_bytes = 64 << 20;
  double timeout = 10;
  int max_connections = 512;
};

// ---- JSON ----

// `text` as a JSON string literal: quotes, backslashes and every control character escaped, and
// bytes that are not valid UTF-8 replaced by U+FFFD, so that any header or path can be echoed.
std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte < 0x80) {
      if (byte == '"' || byte == '\\') {
        out += '\\';
        out += static_cast<char>(byte);
      } else if (byte < 0x20 || byte == 0x7f) {
        char escaped[8];
        std::snprintf(escaped, sizeof escaped, "\\u%04x", byte);
        out += escaped;
      } else {
        out += static_cast<char>(byte);
      }
      ++i;
      continue;
    }
    // A UTF-8 sequence: its length from the lead byte, continuation bytes 10xxxxxx, no overlong
    // forms, no surrogates, nothing above U+10FFFF.
    const size_t length = byte >= 0xc2 && byte <= 0xdf ? 2 : byte >= 0xe0 && byte <= 0xef ? 3 : byte >= 0xf0 && byte <= 0xf4 ? 4 : 0;
    bool valid = length != 0 && i + length <= text.size();
    for (size_t k = 1; valid && k < length; ++k) valid = (static_cast<unsigned char>(text[i + k]) & 0xc0) == 0x80;
    if (valid && length >= 3) {
      const auto second = static_cast<unsigned char>(text[i + 1]);
      valid = !(byte == 0xe0 && second < 0xa0) && !(byte == 0xed && second >= 0xa0) && !(byte == 0xf0 && second < 0x90) &&
              !(byte == 0xf4 && second >= 0x90);
    }
    if (valid) {
      out.append(text.substr(i, length));
      i += length;
    } else {
      out += "\\ufffd";
      ++i;
    }
  }
  return out + "\"";
}

// A client's text echoed in a message: at most `limit` bytes.
std::string clip(std::string_view text, size_t limit = 64) {
  return text.size() <= limit ? std::string(text) : std::string(text.substr(0, limit)) + "...";
}

// ---- errors ----

// A request that cannot be served: its HTTP status and the message sent back.
struct Rejection {
  http::status status;
  std::string message;
};

std::string exception_text(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  return c10_error ? c10_error->what_without_backtrace() : error.what();
}

// What the model said about an input it rejected, as one line for the client, or nothing when
// that line would show server internals. The TorchScript interpreter wraps the op's message
// ("Conv2d(in_channels=2): expected ...") in a traceback and puts it after "<Kind>Error: ".
std::optional<std::string> model_message(const std::string& text) {
  std::string line = text.substr(0, text.find('\n'));
  if (text.find("TorchScript interpreter") != std::string::npos) {
    line.clear();
    std::stringstream stream(text);
    std::string candidate;
    bool in_traceback = false;
    while (std::getline(stream, candidate)) {
      if (candidate.rfind("Traceback", 0) == 0) in_traceback = true;
      const size_t colon = candidate.find("Error: ");
      // The first unindented "...Error: message" line after the traceback.
      if (in_traceback && colon != std::string::npos && !candidate.empty() && candidate[0] != ' ' &&
          candidate.find(' ') > colon) {
        line = candidate.substr(colon + 7);
        break;
      }
    }
  }
  for (const char* internal : {"INTERNAL ASSERT", "Exception raised from", ".cpp", ".cc:", ".h:", ".hpp", ".cu:",
                               ".cuh", "frame #", "0x"}) {
    if (line.find(internal) != std::string::npos) return std::nullopt;
  }
  if (line.empty()) return std::nullopt;
  return clip(line, 512);
}

// ---- requests ----

std::string_view header(const http::request<http::string_body>& request, std::string_view name) {
  const auto found = request.find(beast::string_view(name.data(), name.size()));
  if (found == request.end()) return {};
  const auto value = found->value();
  return {value.data(), value.size()};
}

std::string_view trim(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
  return text;
}

// X-Shape's sizes. Their product, with zeros counted as ones, must fit in --max-bytes: a shape
// like 0,2^40,2^40 holds no values but is no input this server accepts either.
std::vector<int64_t> parse_shape(std::string_view text, uint64_t max_bytes) {
  if (text.empty()) throw Rejection{http::status::bad_request, "missing X-Shape header: the input's sizes, e.g. X-Shape: 4,3,784"};
  const std::string malformed = "X-Shape must be 1 to 8 comma-separated non-negative whole numbers, got '" + clip(text) + "'";
  std::vector<int64_t> sizes;
  uint64_t product = 1;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string_view item = trim(text.substr(start, comma == std::string_view::npos ? comma : comma - start));
    if (item.empty() || item.size() > 15 || sizes.size() == kMaxRank) throw Rejection{http::status::bad_request, malformed};
    int64_t size = 0;
    for (const char digit : item) {
      if (digit < '0' || digit > '9') throw Rejection{http::status::bad_request, malformed};
      size = size * 10 + (digit - '0');
    }
    sizes.push_back(size);
    if (__builtin_mul_overflow(product, static_cast<uint64_t>(std::max<int64_t>(size, 1)), &product) ||
        product > max_bytes / sizeof(float)) {
      throw Rejection{http::status::bad_request, "X-Shape '" + clip(text) + "' is larger than this server accepts (" +
                                                     std::to_string(max_bytes / sizeof(float)) +
                                                     " float32 values at most, zero sizes counted as one)"};
    }
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return sizes;
}

std::string shape_header(at::IntArrayRef sizes) {
  std::string text;
  for (const int64_t size : sizes) text += (text.empty() ? "" : ",") + std::to_string(size);
  return text;
}

// ---- the inference pool ----

class WorkerPool {
 public:
  explicit WorkerPool(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~WorkerPool() { stop(); }

  void post(std::function<void()> task) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (stopped_) return;
      tasks_.push_back(std::move(task));
    }
    ready_.notify_one();
  }

  // Finishes the running tasks, drops the queued ones, joins the threads.
  void stop() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stopped_ = true;
      tasks_.clear();
    }
    ready_.notify_all();
    for (auto& worker : workers_) {
      if (worker.joinable()) worker.join();
    }
  }

 private:
  void work() {
    while (true) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stopped_ || !tasks_.empty(); });
        if (stopped_) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      try {
        task();
      } catch (const std::exception& error) {  // e.g. out of memory building the answer: drop it
        std::fprintf(stderr, "matterhorn_serve: a request was dropped: %s\n", error.what());
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  bool stopped_ = false;
  std::vector<std::thread> workers_;
};

// ---- the server ----

using Response = http::response<http::string_body>;

Response json_response(http::status status, const std::string& body) {
  Response response{status, 11};
  response.set(http::field::server, "matterhorn_serve");
  response.set(http::field::content_type, "application/json");
  response.body() = body + "\n";
  return response;
}

Response error_response(http::status status, const std::string& message) {
  return json_response(status, "{\"error\": " + json_string(message) + "}");
}

struct Server {
  Options options;
  matterhorn::tools::Model model;
  WorkerPool pool;
  std::atomic<int> connections{0};

  Server(Options options_, const std::string& path)
      : options(std::move(options_)), model(path), pool(options.threads) {}

  std::chrono::steady_clock::duration timeout() const {
    return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(options.timeout));
  }

  // Runs on a worker. Never throws: every failure becomes a JSON error.
  Response infer(const std::vector<int64_t>& sizes, const std::string& body) {
    try {
      at::Tensor output;
      try {
        at::Tensor input = at::empty(sizes, at::kFloat);
        if (!body.empty()) std::memcpy(input.mutable_data_ptr<float>(), body.data(), body.size());
        output = model(input);
      } catch (const matterhorn::tools::ModelOutputError& error) {
        std::fprintf(stderr, "matterhorn_serve: %s\n", error.what());
        return error_response(http::status::internal_server_error, "the model's output cannot be sent: it is not a tensor");
      } catch (const std::bad_alloc&) {
        return error_response(http::status::service_unavailable, "not enough memory to run the model on this input");
      } catch (const c10::OutOfMemoryError&) {
        return error_response(http::status::service_unavailable, "not enough memory to run the model on this input");
      } catch (const std::exception& error) {  // the model's own checks: the input does not fit it
        const std::string text = exception_text(error);
        if (const auto message = model_message(text)) return error_response(http::status::unprocessable_entity, *message);
        std::fprintf(stderr, "matterhorn_serve: the model failed on an input of shape [%s]: %s\n",
                     shape_header(sizes).c_str(), text.c_str());
        return error_response(http::status::unprocessable_entity, "the model cannot run on this input");
      }
      output = output.to(at::kFloat).contiguous();
      Response response{http::status::ok, 11};
      response.set(http::field::server, "matterhorn_serve");
      response.set(http::field::content_type, "application/octet-stream");
      response.set("X-Shape", shape_header(output.sizes()));
      response.set("X-Dtype", "float32");
      response.body().assign(static_cast<const char*>(output.const_data_ptr()), output.numel() * sizeof(float));
      return response;
    } catch (const std::exception& error) {
      std::fprintf(stderr, "matterhorn_serve: internal error: %s\n", exception_text(error).c_str());
    } catch (...) {
      std::fprintf(stderr, "matterhorn_serve: internal error: an unknown exception\n");
    }
    return error_response(http::status::internal_server_error, "internal server error");
  }

  std::string health() const {
    return "{\"status\": \"ok\", \"model\": " + json_string(options.model) +
           ", \"matterhorn\": " + json_string(matterhorn::version()) + ", \"threads\": " + std::to_string(options.threads) + "}";
  }
};

// One connection: read a request (headers, then the body), answer it, repeat while keep-alive.
// All its handlers run on its strand.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, Server& server) : stream_(std::move(socket)), server_(server) { ++server_.connections; }
  ~Session() { --server_.connections; }

  void start() { net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->read_header(); }); }

 private:
  void read_header() {
    parser_.emplace();
    parser_->header_limit(kHeaderLimit);
    parser_->body_limit(server_.options.max_bytes);
    // One deadline for the whole request, headers and body, and the idle time before it.
    stream_.expires_after(server_.timeout());
    http::async_read_header(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code error, size_t) {
      self->on_header(error);
    });
  }

  void on_header(beast::error_code error) {
    if (error) return on_read_error(error);
    const auto& request = parser_->get();
    const std::string_view encoding = trim(header(request, "Content-Encoding"));
    if (!encoding.empty() && !beast::iequals(beast::string_view(encoding.data(), encoding.size()), "identity")) {
      return reject_unread(http::status::unsupported_media_type,
                           "compressed bodies are not accepted (Content-Encoding: " + clip(encoding) + "); send raw float32 values");
    }
    for (const auto coding : http::token_list(request[http::field::transfer_encoding])) {
      if (!beast::iequals(coding, "chunked")) {
        return reject_unread(http::status::unsupported_media_type,
                             "only the chunked transfer coding is accepted, got '" + clip(std::string_view(coding.data(), coding.size())) + "'");
      }
    }
    const std::string_view expect = trim(header(request, "Expect"));
    if (!expect.empty()) {
      if (!beast::iequals(beast::string_view(expect.data(), expect.size()), "100-continue")) {
        return reject_unread(http::status::expectation_failed, "only Expect: 100-continue is supported");
      }
      auto proceed = std::make_shared<http::response<http::empty_body>>(http::status::continue_, 11);
      return http::async_write(stream_, *proceed, [self = shared_from_this(), proceed](beast::error_code error, size_t) {
        if (error) return self->close();
        self->read_body();
      });
    }
    read_body();
  }

  void read_body() {
    http::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code error, size_t) {
      if (error) return self->on_read_error(error);
      self->on_request(self->parser_->release());
    });
  }

  void on_read_error(beast::error_code error) {
    if (error == http::error::body_limit) {
      return reject_unread(http::status::payload_too_large,
                           "the request body is larger than this server accepts (" +
                               std::to_string(server_.options.max_bytes) + " bytes at most)");
    }
    if (error == http::error::header_limit) {
      return reject_unread(http::status::request_header_fields_too_large, "the request headers exceed 16 KiB");
    }
    // Timeouts, resets and the client's close end the connection quietly; broken HTTP gets a 400.
    if (error.category() == beast::error_code(http::error::end_of_stream).category() && error != http::error::end_of_stream &&
        error != http::error::partial_message && error != http::error::need_more) {
      return reject_unread(http::status::bad_request, "malformed HTTP request (" + error.message() + ")");
    }
    close();
  }

  void on_request(http::request<http::string_body> request) {
    keep_alive_ = request.keep_alive();
    const std::string_view target(request.target().data(), request.target().size());
    const std::string_view path = target.substr(0, target.find('?'));
    if (path == "/health") {
      if (request.method() != http::verb::get) return reply(method_not_allowed("GET"));
      return reply(json_response(http::status::ok, server_.health()));
    }
    if (path != "/infer") {
      return reply(error_response(http::status::not_found, "no such endpoint: " + std::string(request.method_string().data(), request.method_string().size()) +
                                                               " " + clip(target, 128) + " (try GET /health or POST /infer)"));
    }
    if (request.method() != http::verb::post) return reply(method_not_allowed("POST"));
    std::vector<int64_t> sizes;
    try {
      const std::string_view dtype = trim(header(request, "X-Dtype"));
      if (!dtype.empty() && dtype != "float32") {
        throw Rejection{http::status::unsupported_media_type, "X-Dtype must be float32, got '" + clip(dtype) + "'"};
      }
      const std::string_view shape = header(request, "X-Shape");
      sizes = parse_shape(shape, server_.options.max_bytes);
      int64_t numel = 1;
      for (const int64_t size : sizes) numel *= size;
      const uint64_t expected = static_cast<uint64_t>(numel) * sizeof(float);
      if (request.body().size() != expected) {
        throw Rejection{http::status::bad_request, "the body has " + std::to_string(request.body().size()) +
                                                       " bytes but X-Shape " + clip(shape) + " of float32 needs " +
                                                       std::to_string(expected)};
      }
    } catch (const Rejection& rejection) {
      return reply(error_response(rejection.status, rejection.message));
    }
    // Inference runs on the pool; the answer comes back to this connection's strand.
    server_.pool.post([self = shared_from_this(), sizes = std::move(sizes), body = std::move(request.body())]() mutable {
      auto response = std::make_shared<Response>(self->server_.infer(sizes, body));
      body = std::string();  // freed on the worker, not kept until the answer is written
      net::post(self->stream_.get_executor(), [self, response] { self->reply(std::move(*response)); });
    });
  }

  Response method_not_allowed(const char* allowed) {
    Response response = error_response(http::status::method_not_allowed, std::string("use ") + allowed + " here");
    response.set(http::field::allow, allowed);
    return response;
  }

  // Answers a request that was read whole; the connection stays open if the client wants it.
  void reply(Response&& response) { write(std::move(response), keep_alive_, false); }

  // Answers a request whose body was not read, then closes the connection.
  void reject_unread(http::status status, const std::string& message) {
    write(error_response(status, message), false, true);
  }

  void write(Response&& response, bool keep_alive, bool drain) {
    response_ = std::make_shared<Response>(std::move(response));
    response_->keep_alive(keep_alive);
    response_->prepare_payload();
    stream_.expires_after(server_.timeout());
    http::async_write(stream_, *response_, [self = shared_from_this(), keep_alive, drain](beast::error_code error, size_t) {
      self->response_.reset();
      if (error) return self->close();
      if (keep_alive) return self->read_header();
      if (drain) return self->drain();
      self->close();
    });
  }

  // Half-closes, then reads and drops what the client still sends, for a bounded time and size.
  void drain() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.expires_after(kDrainTime);
    drained_ = 0;
    drain_more();
  }

  void drain_more() {
    scratch_.resize(64 * 1024);
    stream_.async_read_some(net::buffer(scratch_), [self = shared_from_this()](beast::error_code error, size_t bytes) {
      self->drained_ += bytes;
      if (error || self->drained_ > kDrainBytes) return self->close();
      self->drain_more();
    });
  }

  void close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.close();
  }

  beast::tcp_stream stream_;
  Server& server_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<Response> response_;
  std::vector<char> scratch_;
  uint64_t drained_ = 0;
  bool keep_alive_ = false;
};

// Accepts connections, up to --max-connections open at once.
class Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(net::io_context& context, tcp::acceptor& acceptor, Server& server)
      : context_(context), acceptor_(acceptor), server_(server), retry_(context) {}

  void accept() {
    acceptor_.async_accept(net::make_strand(context_), [self = shared_from_this()](beast::error_code error, tcp::socket socket) {
      self->on_accept(error, std::move(socket));
    });
  }

 private:
  void on_accept(beast::error_code error, tcp::socket socket) {
    if (error == net::error::operation_aborted) return;
    if (error) {  // out of file descriptors, most likely: try again shortly instead of spinning
      retry_.expires_after(std::chrono::milliseconds(50));
      retry_.async_wait([self = shared_from_this()](beast::error_code) { self->accept(); });
      return;
    }
    if (server_.connections.load() >= server_.options.max_connections) {
      beast::error_code ignored;
      socket.close(ignored);
    } else {
      std::make_shared<Session>(std::move(socket), server_)->start();
    }
    accept();
  }

  net::io_context& context_;
  tcp::acceptor& acceptor_;
  Server& server_;
  net::steady_timer retry_;
};

// ---- options ----

// A whole argument as a number in [low, high], or nothing.
std::optional<double> number(const std::string& text, double low, double high) {
  if (text.empty() || text.find_first_not_of("0123456789.") != std::string::npos) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (*end != '\0' || errno != 0 || !(value >= low && value <= high)) return std::nullopt;
  return value;
}

std::optional<Options> parse_options(int argc, char** argv, int& status) {
  status = 2;
  Options options;
  auto fail = [](const std::string& message) {
    std::fprintf(stderr, "matterhorn_serve: %s\n%s", message.c_str(), kUsage);
    return std::nullopt;
  };
  for (int i = 1; i < argc; ++i) {
    std::string argument = argv[i];
    if (argument == "--help" || argument == "-h") {
      std::printf("%s", kUsage);
      status = 0;
      return std::nullopt;
    }
    if (argument.rfind("--", 0) != 0) {
      if (!options.model.empty()) return fail("one model only, got '" + options.model + "' and '" + argument + "'");
      options.model = argument;
      continue;
    }
    std::string value;
    const size_t equals = argument.find('=');
    if (equals != std::string::npos) {
      value = argument.substr(equals + 1);
      argument.resize(equals);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return fail(argument + " needs a value");
    }
    auto whole = [&](double low, double high) -> std::optional<int64_t> {
      const auto parsed = number(value, low, high);
      if (!parsed || value.find('.') != std::string::npos) return std::nullopt;
      return static_cast<int64_t>(*parsed);
    };
    if (argument == "--port") {
      const auto port = whole(0, 65535);
      if (!port) return fail("--port takes a whole number from 0 to 65535, got '" + value + "'");
      options.port = static_cast<int>(*port);
    } else if (argument == "--threads") {
      const auto threads = whole(1, 256);
      if (!threads) return fail("--threads takes a whole number from 1 to 256, got '" + value + "'");
      options.threads = static_cast<int>(*threads);
    } else if (argument == "--max-bytes") {
      const auto bytes = whole(1, static_cast<double>(int64_t{1} << 40));
      if (!bytes) return fail("--max-bytes takes a whole number of bytes from 1 to 2^40, got '" + value + "'");
      options.max_bytes = static_cast<uint64_t>(*bytes);
    } else if (argument == "--timeout") {
      const auto seconds = number(value, 0.1, 3600);
      if (!seconds) return fail("--timeout takes seconds from 0.1 to 3600, got '" + value + "'");
      options.timeout = *seconds;
    } else if (argument == "--max-connections") {
      const auto connections = whole(1, 65536);
      if (!connections) return fail("--max-connections takes a whole number from 1 to 65536, got '" + value + "'");
      options.max_connections = static_cast<int>(*connections);
    } else {
      return fail("unknown option " + argument);
    }
  }
  if (options.model.empty()) return fail("no model given");
  return options;
}

// Each connection takes a file descriptor: make room for --max-connections of them.
void raise_descriptor_limit(int connections) {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
  const rlim_t wanted = static_cast<rlim_t>(connections) + 64;
  if (limit.rlim_cur >= wanted) return;
  limit.rlim_cur = limit.rlim_max == RLIM_INFINITY ? wanted : std::min(wanted, limit.rlim_max);
  setrlimit(RLIMIT_NOFILE, &limit);
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGPIPE, SIG_IGN);  // a closed stdout or stderr must not end the server
  int status = 0;
  const std::optional<Options> options = parse_options(argc, argv, status);
  if (!options) return status;
  raise_descriptor_limit(options->max_connections);

  std::unique_ptr<Server> server;
  try {
    server = std::make_unique<Server>(*options, options->model);
  } catch (const std::exception& error) {
    const std::string text = exception_text(error);
    // the whole message (a schema mismatch starts with an empty line and names the op after it)
    const size_t start = std::min(text.find_first_not_of(" \n"), text.size());
    std::fprintf(stderr, "matterhorn_serve: cannot load the model '%s': %s\n", options->model.c_str(),
                 text.substr(start).c_str());
    return 1;
  }

  net::io_context context{kIoThreads};
  tcp::acceptor acceptor(context);
  try {
    const tcp::endpoint endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(options->port));
    acceptor.open(endpoint.protocol());
    acceptor.set_option(net::socket_base::reuse_address(true));
    acceptor.bind(endpoint);
    acceptor.listen(net::socket_base::max_listen_connections);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "matterhorn_serve: cannot listen on 127.0.0.1:%d: %s\n", options->port, error.what());
    return 1;
  }
  std::printf("listening on 127.0.0.1:%d\n", static_cast<int>(acceptor.local_endpoint().port()));
  std::fflush(stdout);

  net::signal_set signals(context, SIGINT, SIGTERM);
  signals.async_wait([&](beast::error_code, int) {
    beast::error_code ignored;
    acceptor.close(ignored);
    context.stop();
  });
  std::make_shared<Listener>(context, acceptor, *server)->accept();

  // A handler that throws (out of memory, most likely) costs its connection, not the server.
  auto run = [&context] {
    while (true) {
      try {
        context.run();
        return;
      } catch (const std::exception& error) {
        std::fprintf(stderr, "matterhorn_serve: a connection was dropped: %s\n", error.what());
      }
    }
  };
  std::vector<std::thread> io_threads;
  for (int i = 1; i < kIoThreads; ++i) io_threads.emplace_back(run);
  run();
  for (auto& thread : io_threads) thread.join();
  server->pool.stop();
  return 0;
}
