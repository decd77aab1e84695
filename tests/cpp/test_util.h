// Helpers shared by the C++ tests: bounded waits on futures and conditions, temporary directories,
// memory figures from /proc, nodes with short test timeouts, and child processes.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "common/future.h"
#include "common/status.h"
#include "net/address.h"
#include "net/identity.h"
#include "net/message.h"
#include "net/node.h"
#include "net/peer_id.h"

extern char** environ;

namespace hivemind {

// Lets GoogleTest print "DEADLINE_EXCEEDED" rather than the bytes of the enum.
inline void PrintTo(StatusCode code, std::ostream* out) { *out << StatusCodeName(code); }

}  // namespace hivemind

namespace hivemind::test {

using net::Message;
using net::Milliseconds;
using net::Node;
using net::NodeOptions;
using net::Payload;
using net::PeerAddress;
using Clock = std::chrono::steady_clock;

// Sanitizer builds run several times slower; timeouts that decide liveness in a test scale by this.
#if defined(__SANITIZE_ADDRESS__)
constexpr int kSlowdown = 3;
#else
constexpr int kSlowdown = 1;
#endif

// How long a test waits for something that should happen "at once" before it calls it a failure.
constexpr Milliseconds kPromptly{5000};

inline double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The result of `future`, or a test failure (and a kInternal status tagged "TEST") when it does not
// complete within `timeout`.
template <class T>
Result<T> Await(const Future<T>& future, Milliseconds timeout = kPromptly) {
  auto result = future.WaitFor(timeout);
  if (!result) {
    ADD_FAILURE() << "a future did not complete within " << timeout.count() << " ms";
    return Status(StatusCode::kInternal, "TEST: the future did not complete in time");
  }
  return *result;
}

// A one-shot event another thread can wait for, with a deadline.
class Notification {
 public:
  void Notify() {
    // Notifying under the lock: a waiter that wakes may destroy this object right after.
    std::lock_guard<std::mutex> lock(mutex_);
    notified_ = true;
    cv_.notify_all();
  }
  bool WaitFor(Milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return notified_; });
  }
  bool HasBeenNotified() {
    std::lock_guard<std::mutex> lock(mutex_);
    return notified_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool notified_ = false;
};

// Re-checks `condition` until it holds or `timeout` passes, for state that offers nothing to wait
// on (an atomic flag, a list of peers). Returns whether it held.
inline bool WaitUntil(const std::function<bool()>& condition, Milliseconds timeout) {
  std::mutex mutex;
  std::condition_variable never_notified;
  std::unique_lock<std::mutex> lock(mutex);
  auto deadline = Clock::now() + timeout;
  while (!condition()) {
    if (Clock::now() >= deadline) return false;
    never_notified.wait_for(lock, Milliseconds(5));
  }
  return true;
}

// A fresh directory under the system's temporary directory, removed with its contents at the end.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "hivemind_test_XXXXXX").string();
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    if (::mkdtemp(buffer.data()) == nullptr) {
      ADD_FAILURE() << "mkdtemp failed: " << std::strerror(errno);
    }
    path_ = buffer.data();
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A field of /proc/self/status in bytes ("VmRSS", "VmHWM"), or -1 if absent.
inline int64_t ProcStatusBytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) != 0) continue;
    std::istringstream fields(line.substr(field.size() + 1));
    int64_t kib = -1;
    fields >> kib;
    return kib * 1024;
  }
  return -1;
}
inline int64_t CurrentRssBytes() { return ProcStatusBytes("VmRSS"); }
inline int64_t PeakRssBytes() { return ProcStatusBytes("VmHWM"); }
// Resets VmHWM to the current RSS (Linux: "5" > /proc/self/clear_refs). Returns whether it worked.
inline bool ResetPeakRss() {
  std::ofstream clear_refs("/proc/self/clear_refs");
  clear_refs << "5";
  clear_refs.flush();
  return static_cast<bool>(clear_refs);
}

// TCP connections in state ESTABLISHED whose local port is `port` (IPv4 and IPv6, all processes of
// this network namespace): for a listening port, the connections it accepted.
inline int CountEstablishedConnectionsToPort(uint16_t port) {
  int count = 0;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream file(table);
    std::string line;
    std::getline(file, line);  // column titles
    while (std::getline(file, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state;
      fields >> slot >> local >> remote >> state;
      auto colon = local.rfind(':');
      if (colon == std::string::npos) continue;
      if (std::stoul(local.substr(colon + 1), nullptr, 16) == port && state == "01") ++count;
    }
  }
  return count;
}

// FNV-1a, 64 bits: a checksum both ends of a transfer can compute.
inline uint64_t Fnv1a(const uint8_t* data, size_t size, uint64_t hash = 14695981039346656037ull) {
  for (size_t i = 0; i < size; ++i) {
    hash ^= data[i];
    hash *= 1099511628211ull;
  }
  return hash;
}

// Deterministic pseudo-random bytes (xorshift64*), fast enough for hundreds of MiB.
inline void FillPattern(uint8_t* data, size_t size, uint64_t seed) {
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    uint64_t word = state * 0x2545F4914F6CDD1Dull;
    std::memcpy(data + i, &word, 8);
  }
  for (; i < size; ++i) data[i] = static_cast<uint8_t>(i * 131 + seed);
}
inline std::string PatternString(size_t size, uint64_t seed) {
  std::string bytes(size, '\0');
  FillPattern(reinterpret_cast<uint8_t*>(bytes.data()), size, seed);
  return bytes;
}

inline Message MakeMessage(std::string header, const std::vector<std::string>& payloads = {}) {
  Message message(std::move(header));
  for (const auto& bytes : payloads) message.payloads.push_back(Payload::FromString(bytes));
  return message;
}

// Options for a node on loopback with short timeouts, so that failures show within seconds.
inline NodeOptions TestNodeOptions() {
  NodeOptions options;
  options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};
  options.default_call_timeout = Milliseconds(10000);
  options.heartbeat_interval = Milliseconds(200);
  options.heartbeat_timeout = Milliseconds(1000);
  options.connect_timeout = Milliseconds(2000);
  return options;
}

// Starts a node; on failure records a test failure and returns nullptr (check with ASSERT_NE).
inline std::unique_ptr<Node> StartNode(NodeOptions options = TestNodeOptions()) {
  auto started = Node::Start(std::move(options));
  if (!started.ok()) {
    ADD_FAILURE() << "Node::Start failed: " << started.status().ToString();
    return nullptr;
  }
  return std::move(started).value();
}

// Reads every message of `stream` until its end; the messages, or the error that ended it.
inline Result<std::vector<Message>> ReadAll(net::Stream& stream, Milliseconds timeout = kPromptly) {
  std::vector<Message> messages;
  while (true) {
    auto next = stream.Read().WaitFor(timeout);
    if (!next) return Status(StatusCode::kInternal, "TEST: a Read did not complete in time");
    if (!next->ok()) return next->status();
    if (!next->value().has_value()) return messages;
    messages.push_back(std::move(*next->value()));
  }
}

// A stream handler that writes back every message it reads, then ends with OK.
inline Status EchoStream(const net::CallContext&, net::Stream& stream) {
  constexpr Milliseconds kWait{10000};
  while (true) {
    auto next = stream.Read().WaitFor(kWait);
    if (!next) return Status(StatusCode::kInternal, "echo_stream: a Read did not complete");
    if (!next->ok()) return next->status();
    if (!next->value().has_value()) return Status::Ok();
    auto written = stream.Write(std::move(*next->value())).WaitFor(kWait);
    if (!written) return Status(StatusCode::kInternal, "echo_stream: a Write did not complete");
    if (!written->ok()) return written->status();
  }
}

// Registers `method` on `node` as an echo: the reply carries the request's header and payloads.
inline void RegisterEcho(Node& node, const std::string& method = "echo") {
  node.RegisterUnary(method, [](const net::CallContext&, Message request, net::Responder respond) {
    respond(std::move(request));
  });
}

// Another process running this same test binary with extra environment variables. Its stdout is a
// pipe read with ReadLine; its stdin is a pipe that stays open while this object lives. It is
// killed with SIGKILL if this process dies, and when this object is destroyed.
class ChildProcess {
 public:
  static std::unique_ptr<ChildProcess> Spawn(const std::vector<std::string>& extra_environment) {
    // Everything exec needs is built before fork: only async-signal-safe calls follow it.
    std::vector<std::string> environment(extra_environment);
    for (char** entry = environ; *entry != nullptr; ++entry) environment.emplace_back(*entry);
    std::vector<char*> envp;
    for (auto& entry : environment) envp.push_back(entry.data());
    envp.push_back(nullptr);
    char exe[] = "/proc/self/exe";
    char* argv[] = {exe, nullptr};

    int out[2], in[2];
    if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(in, O_CLOEXEC) != 0) {
      ADD_FAILURE() << "pipe failed: " << std::strerror(errno);
      return nullptr;
    }
    pid_t parent = ::getpid();
    pid_t pid = ::fork();
    if (pid < 0) {
      ADD_FAILURE() << "fork failed: " << std::strerror(errno);
      return nullptr;
    }
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(3);
      ::dup2(out[1], STDOUT_FILENO);
      ::dup2(in[0], STDIN_FILENO);
      ::execve(exe, argv, envp.data());
      ::_exit(127);
    }
    ::close(out[1]);
    ::close(in[0]);
    return std::unique_ptr<ChildProcess>(new ChildProcess(pid, out[0], in[1]));
  }

  ~ChildProcess() {
    Kill(SIGKILL);
    Reap();
    ::close(stdout_fd_);
    ::close(stdin_fd_);
  }

  pid_t pid() const { return pid_; }

  // The next line the child wrote (without '\n'), or nullopt after `timeout` or at end of file.
  std::optional<std::string> ReadLine(Milliseconds timeout) {
    auto deadline = Clock::now() + timeout;
    while (true) {
      auto newline = buffer_.find('\n');
      if (newline != std::string::npos) {
        std::string line = buffer_.substr(0, newline);
        buffer_.erase(0, newline + 1);
        return line;
      }
      auto left = std::chrono::duration_cast<Milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return std::nullopt;
      pollfd descriptor{stdout_fd_, POLLIN, 0};
      int ready = ::poll(&descriptor, 1, static_cast<int>(left));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) return std::nullopt;
      char chunk[4096];
      ssize_t got = ::read(stdout_fd_, chunk, sizeof(chunk));
      if (got <= 0) return std::nullopt;
      buffer_.append(chunk, static_cast<size_t>(got));
    }
  }

  void Kill(int signal_number) {
    if (!reaped_) ::kill(pid_, signal_number);
  }

  // Waits for the child to end; its wait status.
  int Reap() {
    if (reaped_) return wait_status_;
    while (::waitpid(pid_, &wait_status_, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    return wait_status_;
  }

 private:
  ChildProcess(pid_t pid, int stdout_fd, int stdin_fd)
      : pid_(pid), stdout_fd_(stdout_fd), stdin_fd_(stdin_fd) {}

  pid_t pid_;
  int stdout_fd_;
  int stdin_fd_;
  std::string buffer_;
  bool reaped_ = false;
  int wait_status_ = 0;
};

}  // namespace hivemind::test
