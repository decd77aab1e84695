// Transport benchmark: two Nodes in one process talk over TCP loopback (127.0.0.1 only), with and
// without CURVE encryption. Measures
//   - unary call throughput for payloads of 64 KiB .. 64 MiB, several calls in flight;
//   - small unary call latency (p50/p99), one call at a time;
//   - one stream writing 1 MiB messages;
// and, in the same run, the same work over raw POSIX TCP sockets (length-prefixed messages, one
// sender thread, one receiver thread; a 64-byte ping-pong for latency). Ratios transport/raw are
// printed next to each result so a reader sees the overhead of the transport, not the machine.
//
//   benchmark_transport [--quick] [--sizes=64K,1M,16M] [--inflight=4] [--mode=both|plain|encrypted]
//
// Exits 1 if any call or transfer fails, 2 on bad flags.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/future.h"
#include "common/status.h"
#include "net/node.h"

namespace {

namespace hm = hivemind;
namespace net = hivemind::net;
using Clock = std::chrono::steady_clock;
using hm::Result;
using hm::Status;
using hm::StatusCode;

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;
// Generous per-call deadline: a 64 MiB encrypted call takes well under a second here, so only a
// stuck transport reaches it. Every wait below is bounded by it plus a margin.
constexpr std::chrono::milliseconds kCallTimeout{60000};
constexpr std::chrono::milliseconds kWaitLimit = kCallTimeout + std::chrono::milliseconds(10000);
// Raw sockets give up after this long without progress instead of blocking forever.
constexpr int kRawSocketTimeoutSeconds = 30;
constexpr size_t kLatencyMessageBytes = 64;

struct Config {
  bool quick = false;
  std::vector<size_t> sizes = {64 * kKiB, 256 * kKiB, 1 * kMiB, 4 * kMiB, 16 * kMiB, 64 * kMiB};
  int inflight = 4;
  bool plain = true;
  bool encrypted = true;
  // Bytes moved per configuration; every size also makes at least `min_calls` measured calls.
  size_t bytes_per_size = 256 * kMiB;
  int min_calls = 8;
  // Warm-up traffic before each measurement (at least one call): connects, and lets the
  // allocator and page cache settle so the first measurement is not penalized.
  size_t warmup_bytes = 32 * kMiB;
  int latency_calls = 2000;
  int latency_warmup_calls = 200;
  size_t stream_message_bytes = 1 * kMiB;
  size_t stream_bytes = 256 * kMiB;

  void MakeQuick() {
    quick = true;
    bytes_per_size = 16 * kMiB;
    min_calls = 4;
    warmup_bytes = 4 * kMiB;
    latency_calls = 200;
    latency_warmup_calls = 20;
    stream_bytes = 16 * kMiB;
  }
};

std::string FormatSize(size_t bytes) {
  char text[32];
  if (bytes >= kMiB && bytes % kMiB == 0) {
    std::snprintf(text, sizeof(text), "%zu MiB", bytes / kMiB);
  } else if (bytes >= kKiB && bytes % kKiB == 0) {
    std::snprintf(text, sizeof(text), "%zu KiB", bytes / kKiB);
  } else {
    std::snprintf(text, sizeof(text), "%zu B", bytes);
  }
  return text;
}

std::string Format(const char* format, double value) {
  char text[64];
  std::snprintf(text, sizeof(text), format, value);
  return text;
}

// "64K", "1M", "1MiB", "4096" -> bytes; nullopt when malformed.
std::optional<size_t> ParseSize(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 12) return std::nullopt;
  size_t value = std::stoull(text.substr(0, digits));
  std::string unit = text.substr(digits);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (unit.empty() || unit == "B") return value;
  if (unit == "K" || unit == "KB" || unit == "KIB") return value * kKiB;
  if (unit == "M" || unit == "MB" || unit == "MIB") return value * kMiB;
  if (unit == "G" || unit == "GB" || unit == "GIB") return value * kMiB * kKiB;
  return std::nullopt;
}

void PrintUsage() {
  std::fprintf(
      stderr,
      "usage: benchmark_transport [--quick] [--sizes=64K,256K,1M,4M,16M,64M]\n"
      "                           [--inflight=4] [--mode=both|plain|encrypted]\n"
      "  --quick     small repeat counts (CI smoke run, a few seconds)\n"
      "  --sizes     payload sizes of the unary throughput test (suffix K or M = KiB, MiB)\n"
      "  --inflight  unary calls kept in flight by the throughput test\n"
      "  --mode      which transport settings to measure\n");
}

// Returns false (after printing why) on a bad flag.
bool ParseFlags(int argc, char** argv, Config& config) {
  // --quick first, so that explicit flags after it are not overwritten by its defaults.
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") config.MakeQuick();
  }
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value_of = [&](const std::string& flag) -> std::optional<std::string> {
      if (arg.rfind(flag + "=", 0) != 0) return std::nullopt;
      return arg.substr(flag.size() + 1);
    };
    if (arg == "--quick") continue;
    if (arg == "--help" || arg == "-h") {
      PrintUsage();
      std::exit(0);
    }
    if (auto sizes = value_of("--sizes")) {
      config.sizes.clear();
      size_t start = 0;
      while (start <= sizes->size()) {
        size_t comma = sizes->find(',', start);
        if (comma == std::string::npos) comma = sizes->size();
        auto size = ParseSize(sizes->substr(start, comma - start));
        // The transport accepts messages up to 1 GiB by default; keep well below it.
        if (!size || *size == 0 || *size > 256 * kMiB) {
          std::fprintf(stderr, "bad size '%s' in --sizes: give 1 B .. 256 MiB, e.g. 64K or 4M\n",
                       sizes->substr(start, comma - start).c_str());
          return false;
        }
        config.sizes.push_back(*size);
        start = comma + 1;
      }
      continue;
    }
    if (auto inflight = value_of("--inflight")) {
      config.inflight = std::atoi(inflight->c_str());
      if (config.inflight < 1 || config.inflight > 256) {
        std::fprintf(stderr, "bad --inflight '%s': give 1 .. 256\n", inflight->c_str());
        return false;
      }
      continue;
    }
    if (auto mode = value_of("--mode")) {
      config.plain = *mode == "both" || *mode == "plain";
      config.encrypted = *mode == "both" || *mode == "encrypted";
      if (!config.plain && !config.encrypted) {
        std::fprintf(stderr, "bad --mode '%s': give both, plain or encrypted\n", mode->c_str());
        return false;
      }
      continue;
    }
    std::fprintf(stderr, "unknown flag '%s'\n", arg.c_str());
    PrintUsage();
    return false;
  }
  return true;
}

// Waits for `future` at most kWaitLimit; a missing result is reported as a failure, never a hang.
template <class T>
Result<T> Await(const hm::Future<T>& future, const std::string& what) {
  auto result = future.WaitFor(kWaitLimit);
  if (!result) {
    return Status(StatusCode::kDeadlineExceeded, what + ": no result after " +
                                                     std::to_string(kWaitLimit.count()) +
                                                     " ms although the call deadline was " +
                                                     std::to_string(kCallTimeout.count()) + " ms");
  }
  if (!result->ok()) return result->status().WithContext(what);
  return std::move(*result);
}

struct Percentiles {
  double p50_us = 0;
  double p99_us = 0;
};

// Nearest-rank percentiles of durations in microseconds.
Percentiles ComputePercentiles(std::vector<double> samples_us) {
  std::sort(samples_us.begin(), samples_us.end());
  auto rank = [&](double q) {
    size_t index = static_cast<size_t>(std::ceil(q * static_cast<double>(samples_us.size())));
    return samples_us[std::min(samples_us.size() - 1, index == 0 ? 0 : index - 1)];
  };
  return Percentiles{rank(0.50), rank(0.99)};
}

double GigabytesPerSecond(size_t bytes, Clock::duration elapsed) {
  double seconds = std::chrono::duration<double>(elapsed).count();
  return static_cast<double>(bytes) / std::max(seconds, 1e-9) / 1e9;
}

// How many calls of `size` bytes move `total` bytes, at least `minimum`.
int CallsFor(size_t total, size_t size, int minimum) {
  size_t calls = (total + size - 1) / size;
  return static_cast<int>(std::max<size_t>(calls, static_cast<size_t>(minimum)));
}

// ---------------------------------------------------------------------------------------------
// Raw TCP reference.

class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  Socket(Socket&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Socket& operator=(Socket&& other) noexcept {
    if (this != &other) {
      Close();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~Socket() { Close(); }
  int fd() const { return fd_; }

 private:
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_ = -1;
};

Status Errno(const std::string& what) {
  int error = errno;
  if (error == EAGAIN || error == EWOULDBLOCK) {
    return Status(StatusCode::kDeadlineExceeded,
                  what + ": no progress for " + std::to_string(kRawSocketTimeoutSeconds) + " s");
  }
  return Status(StatusCode::kUnavailable, what + ": " + std::strerror(error));
}

Status ConfigureRawSocket(int fd) {
  // Bounded blocking: a stuck peer turns into an error after the timeout instead of a hang.
  timeval timeout{kRawSocketTimeoutSeconds, 0};
  int one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)) != 0 ||
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout)) != 0 ||
      // Small ping-pong messages must leave at once, as ZeroMQ sends them (it sets TCP_NODELAY).
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    return Errno("setsockopt");
  }
  return Status::Ok();
}

// A connected pair of TCP sockets over 127.0.0.1, port chosen by the kernel.
Result<std::pair<Socket, Socket>> RawConnectedPair() {
  Socket listener(::socket(AF_INET, SOCK_STREAM, 0));
  if (listener.fd() < 0) return Errno("socket");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  if (::bind(listener.fd(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::listen(listener.fd(), 1) != 0 ||
      ::getsockname(listener.fd(), reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return Errno("listening on 127.0.0.1");
  }
  Socket sender(::socket(AF_INET, SOCK_STREAM, 0));
  if (sender.fd() < 0) return Errno("socket");
  // The listen backlog holds the connection, so connect completes before accept is called.
  if (::connect(sender.fd(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    return Errno("connecting to 127.0.0.1");
  }
  Socket receiver(::accept(listener.fd(), nullptr, nullptr));
  if (receiver.fd() < 0) return Errno("accept");
  for (const Socket* socket : {&sender, &receiver}) {
    Status configured = ConfigureRawSocket(socket->fd());
    if (!configured.ok()) return configured;
  }
  return std::make_pair(std::move(sender), std::move(receiver));
}

Status SendAll(int fd, iovec* iov, int count) {
  while (count > 0) {
    msghdr message{};
    message.msg_iov = iov;
    message.msg_iovlen = static_cast<size_t>(count);
    ssize_t sent = ::sendmsg(fd, &message, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      return Errno("raw send");
    }
    auto left = static_cast<size_t>(sent);
    while (count > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --count;
    }
    if (count > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return Status::Ok();
}

Status ReceiveAll(int fd, void* data, size_t size) {
  auto* cursor = static_cast<char*>(data);
  while (size > 0) {
    ssize_t received = ::recv(fd, cursor, size, 0);
    if (received < 0) {
      if (errno == EINTR) continue;
      return Errno("raw receive");
    }
    if (received == 0) return Status(StatusCode::kUnavailable, "raw receive: connection closed");
    cursor += received;
    size -= static_cast<size_t>(received);
  }
  return Status::Ok();
}

// Sends `count` length-prefixed messages of `size` bytes from one thread while another receives
// them into a reused buffer; the time ends when the receiver has the last byte.
Result<Clock::duration> RawTransfer(const Socket& sender, const Socket& receiver,
                                    const std::vector<char>& body, std::vector<char>& inbox,
                                    int count) {
  Status receive_status;
  auto start = Clock::now();
  std::thread receive_thread([&] {
    for (int i = 0; i < count; ++i) {
      uint64_t length = 0;
      receive_status = ReceiveAll(receiver.fd(), &length, sizeof(length));
      if (!receive_status.ok()) return;
      if (length != inbox.size()) {
        receive_status = Status(StatusCode::kProtocolError, "raw receive: bad length prefix");
        return;
      }
      receive_status = ReceiveAll(receiver.fd(), inbox.data(), inbox.size());
      if (!receive_status.ok()) return;
    }
  });
  Status send_status;
  for (int i = 0; i < count && send_status.ok(); ++i) {
    uint64_t length = body.size();
    iovec iov[2] = {{&length, sizeof(length)}, {const_cast<char*>(body.data()), body.size()}};
    send_status = SendAll(sender.fd(), iov, 2);
  }
  // After a failed send, shutting the receiving end down wakes the receiver at once.
  if (!send_status.ok()) ::shutdown(receiver.fd(), SHUT_RDWR);
  receive_thread.join();
  auto elapsed = Clock::now() - start;
  if (!send_status.ok()) return send_status;
  if (!receive_status.ok()) return receive_status;
  return elapsed;
}

Result<double> RawThroughput(const Config& config, size_t size) {
  auto pair = RawConnectedPair();
  if (!pair.ok()) return pair.status();
  auto& [sender, receiver] = *pair;
  // Touch every page once, so page faults are not part of the measurement (as for the transport,
  // whose payload buffer is filled before sending).
  std::vector<char> body(size, 'r');
  std::vector<char> inbox(size, 0);
  int warmup = CallsFor(config.warmup_bytes, size, 1);
  auto warm = RawTransfer(sender, receiver, body, inbox, warmup);
  if (!warm.ok()) return warm.status();
  int count = CallsFor(config.bytes_per_size, size, config.min_calls);
  auto elapsed = RawTransfer(sender, receiver, body, inbox, count);
  if (!elapsed.ok()) return elapsed.status();
  return GigabytesPerSecond(size * static_cast<size_t>(count), *elapsed);
}

// 64-byte ping-pong: one thread echoes, the caller times each round trip.
Result<Percentiles> RawLatency(const Config& config) {
  auto pair = RawConnectedPair();
  if (!pair.ok()) return pair.status();
  auto& [client, server] = *pair;
  int total = config.latency_warmup_calls + config.latency_calls;
  Status echo_status;
  std::thread echo_thread([&] {
    char buffer[kLatencyMessageBytes];
    for (int i = 0; i < total; ++i) {
      echo_status = ReceiveAll(server.fd(), buffer, sizeof(buffer));
      if (!echo_status.ok()) return;
      iovec iov{buffer, sizeof(buffer)};
      echo_status = SendAll(server.fd(), &iov, 1);
      if (!echo_status.ok()) return;
    }
  });
  std::vector<double> samples;
  samples.reserve(static_cast<size_t>(config.latency_calls));
  Status status;
  char message[kLatencyMessageBytes];
  std::memset(message, 'p', sizeof(message));
  char reply[kLatencyMessageBytes];
  for (int i = 0; i < total && status.ok(); ++i) {
    auto start = Clock::now();
    iovec iov{message, sizeof(message)};
    status = SendAll(client.fd(), &iov, 1);
    if (status.ok()) status = ReceiveAll(client.fd(), reply, sizeof(reply));
    auto elapsed = Clock::now() - start;
    if (i >= config.latency_warmup_calls) {
      samples.push_back(std::chrono::duration<double, std::micro>(elapsed).count());
    }
  }
  // On failure, shutting the socket down wakes the echo thread at once.
  if (!status.ok()) ::shutdown(client.fd(), SHUT_RDWR);
  echo_thread.join();
  if (!status.ok()) return status;
  if (!echo_status.ok()) return echo_status;
  return ComputePercentiles(std::move(samples));
}

// ---------------------------------------------------------------------------------------------
// Transport.

constexpr char kSinkMethod[] = "bench.sink";
constexpr char kEchoMethod[] = "bench.echo";
constexpr char kStreamSinkMethod[] = "bench.stream_sink";
constexpr char kSinkReply[] = "ok";

struct NodePair {
  std::unique_ptr<net::Node> server;
  std::unique_ptr<net::Node> client;
  net::PeerAddress server_address;

  ~NodePair() {
    // The client first: its pending calls fail with CANCELLED instead of waiting on the server.
    if (client) client->Shutdown();
    if (server) server->Shutdown();
  }
};

void RegisterBenchmarkHandlers(net::Node& server) {
  // The request header names the payload size the caller sent, so a transport that loses or
  // truncates bytes fails the benchmark instead of looking fast.
  server.RegisterUnary(
      kSinkMethod, [](const net::CallContext&, net::Message request, net::Responder respond) {
        std::string received = std::to_string(request.PayloadBytes());
        if (request.header != received) {
          respond(Status(StatusCode::kInvalidArgument,
                         "sent " + request.header + " payload bytes, received " + received));
          return;
        }
        respond(net::Message(kSinkReply));
      });
  server.RegisterUnary(kEchoMethod,
                       [](const net::CallContext&, net::Message request, net::Responder respond) {
                         respond(net::Message(std::move(request.header)));
                       });
  // Reads until the caller closes its side, then answers with the byte count it saw.
  server.RegisterStream(
      kStreamSinkMethod, [](const net::CallContext& context, net::Stream& stream) -> Status {
        size_t total = 0;
        for (;;) {
          auto left = context.deadline - Clock::now() + std::chrono::seconds(1);
          auto next = stream.Read().WaitFor(left);
          if (!next) return Status(StatusCode::kDeadlineExceeded, "stream sink: read timed out");
          if (!next->ok()) return next->status();
          if (!next->value()) break;  // the caller closed its writes
          total += next->value()->PayloadBytes();
        }
        auto written = stream.Write(net::Message(std::to_string(total)))
                           .WaitFor(context.deadline - Clock::now() + std::chrono::seconds(1));
        if (!written) return Status(StatusCode::kDeadlineExceeded, "stream sink: reply timed out");
        return written->status();
      });
}

Result<std::unique_ptr<NodePair>> StartNodePair(bool encryption) {
  auto pair = std::make_unique<NodePair>();
  net::NodeOptions options;
  options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};  // loopback only, never other interfaces
  options.encryption = encryption;
  options.default_call_timeout = kCallTimeout;
  auto server = net::Node::Start(options);
  if (!server.ok()) return server.status().WithContext("starting the server node");
  pair->server = std::move(*server);
  RegisterBenchmarkHandlers(*pair->server);
  pair->server_address = pair->server->visible_address();

  // The caller needs no listening socket: replies come back over its own connection.
  options.client_mode = true;
  auto client = net::Node::Start(options);
  if (!client.ok()) return client.status().WithContext("starting the client node");
  pair->client = std::move(*client);
  return pair;
}

net::CallOptions BenchCallOptions() {
  net::CallOptions options;
  options.timeout = kCallTimeout;
  return options;
}

// `calls` unary calls carrying one `payload` each (the same read-only buffer every time: the
// transport never writes to it), keeping `inflight` in flight. Returns the elapsed time.
Result<Clock::duration> RunUnaryCalls(NodePair& pair, const net::Payload& payload, int calls,
                                      int inflight) {
  std::string header = std::to_string(payload.size());
  std::deque<hm::Future<net::Message>> pending;
  Status failure;
  auto complete_oldest = [&] {
    auto reply = Await(pending.front(), std::string("unary call of ") + FormatSize(payload.size()));
    pending.pop_front();
    if (!reply.ok()) return reply.status();
    if (reply->header != kSinkReply) {
      return Status(StatusCode::kInternal, "unexpected reply '" + reply->header + "'");
    }
    return Status::Ok();
  };
  auto start = Clock::now();
  for (int i = 0; i < calls && failure.ok(); ++i) {
    if (static_cast<int>(pending.size()) >= inflight) failure = complete_oldest();
    if (!failure.ok()) break;
    pending.push_back(pair.client->Call(pair.server_address, kSinkMethod,
                                        net::Message(header, {payload}), BenchCallOptions()));
  }
  while (!pending.empty()) {
    if (!failure.ok()) pending.front().Cancel();  // stop the rest quickly after a failure
    Status status = complete_oldest();
    if (failure.ok()) failure = status;
  }
  auto elapsed = Clock::now() - start;
  if (!failure.ok()) return failure;
  return elapsed;
}

Result<double> UnaryThroughput(const Config& config, NodePair& pair, size_t size) {
  net::Payload payload = net::Payload::Allocate(size);
  std::memset(payload.mutable_data(), 0xA5, size);
  auto warm = RunUnaryCalls(pair, payload, CallsFor(config.warmup_bytes, size, 1), config.inflight);
  if (!warm.ok()) return warm.status().WithContext("warm-up");
  int calls = CallsFor(config.bytes_per_size, size, config.min_calls);
  auto elapsed = RunUnaryCalls(pair, payload, calls, config.inflight);
  if (!elapsed.ok()) return elapsed.status();
  return GigabytesPerSecond(size * static_cast<size_t>(calls), *elapsed);
}

Result<Percentiles> UnaryLatency(const Config& config, NodePair& pair) {
  const std::string header(kLatencyMessageBytes, 'p');
  std::vector<double> samples;
  samples.reserve(static_cast<size_t>(config.latency_calls));
  for (int i = 0; i < config.latency_warmup_calls + config.latency_calls; ++i) {
    auto start = Clock::now();
    auto reply = Await(pair.client->Call(pair.server_address, kEchoMethod, net::Message(header),
                                         BenchCallOptions()),
                       "small unary call");
    auto elapsed = Clock::now() - start;
    if (!reply.ok()) return reply.status();
    if (reply->header != header) {
      return Status(StatusCode::kInternal, "the echo call returned a different header");
    }
    if (i >= config.latency_warmup_calls) {
      samples.push_back(std::chrono::duration<double, std::micro>(elapsed).count());
    }
  }
  return ComputePercentiles(std::move(samples));
}

// One stream: `messages` writes of `payload`, then the server's byte count. The time ends when the
// count arrives, so it covers delivery of every byte, not just handing them to the connection.
Result<Clock::duration> RunStream(NodePair& pair, const net::Payload& payload, int messages) {
  // Writes complete once handed to the connection and wait while the reader's window is full;
  // keeping a few outstanding keeps the pipe busy without unbounded queuing.
  constexpr size_t kOutstandingWrites = 8;
  auto start = Clock::now();
  auto stream = pair.client->OpenStream(pair.server_address, kStreamSinkMethod, BenchCallOptions());
  std::deque<hm::Future<hm::Empty>> writes;
  Status failure;
  for (int i = 0; i < messages && failure.ok(); ++i) {
    if (writes.size() >= kOutstandingWrites) {
      failure = Await(writes.front(), "stream write").status();
      writes.pop_front();
    }
    if (failure.ok()) writes.push_back(stream->Write(net::Message("", {payload})));
  }
  if (!failure.ok()) stream->Cancel();  // fails the remaining writes at once
  while (!writes.empty()) {
    Status status = Await(writes.front(), "stream write").status();
    writes.pop_front();
    if (failure.ok()) failure = status;
  }
  if (!failure.ok()) return failure;
  stream->CloseWrite();
  auto count = Await(stream->Read(), "reading the stream's byte count");
  if (!count.ok()) return count.status();
  auto elapsed = Clock::now() - start;
  std::string expected = std::to_string(payload.size() * static_cast<size_t>(messages));
  if (!count->has_value() || (*count)->header != expected) {
    return Status(StatusCode::kInternal, "the stream server did not count " + expected + " bytes");
  }
  auto end = Await(stream->Read(), "reading the end of the stream");
  if (!end.ok()) return end.status();
  if (end->has_value()) return Status(StatusCode::kInternal, "the stream did not end");
  return elapsed;
}

Result<double> StreamThroughput(const Config& config, NodePair& pair) {
  size_t size = config.stream_message_bytes;
  net::Payload payload = net::Payload::Allocate(size);
  std::memset(payload.mutable_data(), 0x5A, size);
  auto warm = RunStream(pair, payload, CallsFor(config.warmup_bytes, size, 1));
  if (!warm.ok()) return warm.status().WithContext("warm-up");
  int messages = CallsFor(config.stream_bytes, size, config.min_calls);
  auto elapsed = RunStream(pair, payload, messages);
  if (!elapsed.ok()) return elapsed.status();
  return GigabytesPerSecond(size * static_cast<size_t>(messages), *elapsed);
}

// ---------------------------------------------------------------------------------------------
// Report.

struct Row {
  std::string test, size, mode, result, reference, ratio;
};

void PrintTable(const std::vector<Row>& rows) {
  Row heading{"test", "size", "mode", "transport", "raw TCP", "ratio"};
  size_t widths[6] = {};
  auto widen = [&](const Row& row) {
    const std::string* cells[6] = {&row.test,   &row.size,      &row.mode,
                                   &row.result, &row.reference, &row.ratio};
    for (int i = 0; i < 6; ++i) widths[i] = std::max(widths[i], cells[i]->size());
  };
  widen(heading);
  for (const auto& row : rows) widen(row);
  auto print = [&](const Row& row) {
    std::printf("%-*s  %*s  %-*s  %*s  %*s  %*s\n", static_cast<int>(widths[0]), row.test.c_str(),
                static_cast<int>(widths[1]), row.size.c_str(), static_cast<int>(widths[2]),
                row.mode.c_str(), static_cast<int>(widths[3]), row.result.c_str(),
                static_cast<int>(widths[4]), row.reference.c_str(), static_cast<int>(widths[5]),
                row.ratio.c_str());
  };
  print(heading);
  size_t total = widths[0] + widths[1] + widths[2] + widths[3] + widths[4] + widths[5] + 10;
  std::printf("%s\n", std::string(total, '-').c_str());
  for (const auto& row : rows) print(row);
}

std::string GbpsCell(const Result<double>& gbps) {
  return gbps.ok() ? Format("%.2f GB/s", *gbps) : "FAILED";
}

std::string LatencyCell(const Result<Percentiles>& latency) {
  if (!latency.ok()) return "FAILED";
  char text[64];
  std::snprintf(text, sizeof(text), "%.0f / %.0f us", latency->p50_us, latency->p99_us);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  if (!ParseFlags(argc, argv, config)) return 2;

  bool failed = false;
  auto report_failure = [&](const std::string& what, const Status& status) {
    failed = true;
    std::fprintf(stderr, "FAILED %s: %s\n", what.c_str(), status.ToString().c_str());
  };
  auto progress = [](const std::string& what) {
    std::fprintf(stderr, "  measuring %s\n", what.c_str());
  };

  std::printf(
      "hivemind transport benchmark: two nodes in one process over 127.0.0.1%s\n"
      "unary: payload per call, %d calls in flight, tiny reply; latency: %zu-byte header echo, "
      "one call at a time, %d calls; stream: %s messages\n"
      "raw TCP: POSIX sockets, length-prefixed messages, one sender and one receiver thread; "
      "ping-pong of %zu bytes\n"
      "GB/s = 1e9 bytes/s. ratio = transport / raw TCP (GB/s: higher is better; latency: p50, "
      "lower is better)\n\n",
      config.quick ? " (--quick: small repeat counts, numbers are rough)" : "", config.inflight,
      kLatencyMessageBytes, config.latency_calls, FormatSize(config.stream_message_bytes).c_str(),
      kLatencyMessageBytes);
  std::fflush(stdout);

  auto ratio_cell = [](const Result<double>& ours, const Result<double>& raw) -> std::string {
    if (!ours.ok() || !raw.ok() || *raw <= 0) return "-";
    return Format("%.2f", *ours / *raw);
  };
  // The raw TCP reference is measured right before each transport measurement rather than once
  // up front: on a shared 2-core machine the load drifts, and adjacent runs keep the ratio honest.
  auto raw_throughput = [&](size_t size) {
    progress("raw TCP " + FormatSize(size));
    auto gbps = RawThroughput(config, size);
    if (!gbps.ok()) report_failure("raw TCP " + FormatSize(size), gbps.status());
    return gbps;
  };

  std::vector<Row> rows;
  std::vector<bool> modes;
  if (config.plain) modes.push_back(false);
  if (config.encrypted) modes.push_back(true);
  for (bool encryption : modes) {
    std::string mode = encryption ? "encrypted" : "plain";
    auto pair = StartNodePair(encryption);
    if (!pair.ok()) {
      report_failure(mode + " nodes", pair.status());
      continue;
    }

    progress("raw TCP ping-pong");
    auto raw_latency = RawLatency(config);
    if (!raw_latency.ok()) report_failure("raw TCP ping-pong", raw_latency.status());
    progress("unary latency, " + mode);
    auto latency = UnaryLatency(config, **pair);
    if (!latency.ok()) report_failure("unary latency, " + mode, latency.status());
    std::string latency_ratio = "-";
    if (latency.ok() && raw_latency.ok() && raw_latency->p50_us > 0) {
      latency_ratio = Format("%.1f", latency->p50_us / raw_latency->p50_us);
    }
    rows.push_back(Row{"unary latency p50/p99", FormatSize(kLatencyMessageBytes), mode,
                       LatencyCell(latency), LatencyCell(raw_latency), latency_ratio});

    for (size_t size : config.sizes) {
      auto raw = raw_throughput(size);
      std::string what = "unary throughput " + FormatSize(size) + ", " + mode;
      progress(what);
      auto gbps = UnaryThroughput(config, **pair, size);
      if (!gbps.ok()) report_failure(what, gbps.status());
      rows.push_back(Row{"unary throughput", FormatSize(size), mode, GbpsCell(gbps), GbpsCell(raw),
                         ratio_cell(gbps, raw)});
    }

    auto raw = raw_throughput(config.stream_message_bytes);
    progress("stream throughput, " + mode);
    auto stream = StreamThroughput(config, **pair);
    if (!stream.ok()) report_failure("stream throughput, " + mode, stream.status());
    rows.push_back(Row{"stream throughput", FormatSize(config.stream_message_bytes), mode,
                       GbpsCell(stream), GbpsCell(raw), ratio_cell(stream, raw)});
  }

  std::printf("\n");
  PrintTable(rows);
  if (failed) {
    std::printf("\nSOME MEASUREMENTS FAILED (see the errors above)\n");
    return 1;
  }
  return 0;
}
