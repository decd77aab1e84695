// Averaging benchmark: one butterfly all-reduce round (AllReduceService) of S bytes of float32
// over n peers on 127.0.0.1, each peer its own OS process with its own net::Node, as torch's Gloo
// runs one process per rank. The parent re-executes this binary once per peer (--worker) and
// drives the workers over pipes: it hands out every address (the group is fixed, no matchmaking),
// starts each round with a barrier, and collects each worker's start and end times on the shared
// monotonic clock. Round time = last end - first start within the group.
//
// Reported per (S, n): median and fastest round time, bus bandwidth 2(n-1)/n * S / time (the
// bytes each peer sends, and receives, in a butterfly all-reduce), and the fraction of a loopback
// bound: all 2(n-1) * S bytes that cross the loopback in one round, at the rate of one raw TCP
// stream measured right before (a sender and a receiver thread; scaled by the number of such pairs
// the cores can run at once, never above n).
//
// Every worker checks every round's result: inputs are member + round + (i % 7) / 2, so the mean
// is known exactly; a wrong value, a takeover or a failed member fails the benchmark.
//
//   benchmark_averaging [--sizes=4M,16M,64M] [--peers=2,4] [--groups=1] [--rounds=5]
//                       [--warmup=1] [--encrypt] [--json] [--quick]
//
// benchmarks/benchmark_averaging.py runs it next to torch's Gloo all_reduce (and hivemind's
// DecentralizedAverager when given a side environment). Exits 1 if a round fails or is wrong,
// 2 on bad flags.

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "averaging/allreduce.h"
#include "averaging/group.h"
#include "common/huge_pages.h"
#include "common/logging.h"
#include "common/status.h"
#include "net/address.h"
#include "net/node.h"

namespace {

namespace hm = hivemind;
namespace net = hivemind::net;
namespace avg = hivemind::averaging;
using Clock = std::chrono::steady_clock;
using hm::Result;
using hm::Status;
using hm::StatusCode;

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;
// A worker that hears nothing from the parent for this long exits (the parent is gone or stuck).
constexpr std::chrono::seconds kWorkerIdleLimit{600};
// Starting a node and reporting its address.
constexpr std::chrono::seconds kStartupLimit{30};
// Filling and checking a vector of 256 MiB takes well under a second; generous for a busy machine.
constexpr std::chrono::seconds kPrepareLimit{60};

struct Config {
  std::vector<size_t> sizes = {4 * kMiB, 16 * kMiB, 64 * kMiB};
  std::vector<int> peers = {2, 4};
  int groups = 1;
  int rounds = 5;
  int warmup = 1;
  bool encrypt = false;
  bool json = false;
  bool quick = false;
  bool tcp_reference = true;
  size_t part_elements = avg::kDefaultPartElements;
  int direct_stream_bytes = -1;  // the round's default
  int timeout_s = 120;
  // A finished round keeps its input copy and results for this long (AllReduceServiceOptions),
  // freed when a later round registers after it. The library's default of 60 s keeps every round
  // of a run in memory (64 MiB, n = 4: 1.6 GiB per peer after 12 rounds, and 4x slower rounds);
  // no peer fails here, so no takeover needs them, and the next round starts only after every
  // peer finished this one.
  int grace_ms = 0;
  // Codec for the whole vector (AllReduceOptions::codecs); "none" sends raw float32.
  std::string codec = "none";
  // Declared bandwidth of group member i (the load balancer sizes shares by them); empty: all 1.
  std::vector<double> bandwidths;
  // Worker w runs in network namespace netns[w].first and listens on netns[w].second
  // (benchmarks/benchmark_load_balance.sh shapes each namespace's link); empty: 127.0.0.1.
  std::vector<std::pair<std::string, std::string>> netns;
  std::string listen_ip = "127.0.0.1";  // a worker's, from --listen-ip
};

// The user-facing codec names (hivemind_backend/compression.py).
std::optional<avg::CodecSpec> CodecByName(const std::string& name) {
  if (name == "none") return avg::CodecSpec::None();
  if (name == "float16") return avg::CodecSpec::Float16();
  if (name == "scaled_float16") return avg::CodecSpec::ScaledFloat16();
  if (name == "uniform8") return avg::CodecSpec::Uniform8();
  if (name == "quantile8") return avg::CodecSpec::Quantile8();
  if (name == "blockwise8") return avg::CodecSpec::Blockwise8();
  return std::nullopt;
}

std::string FormatSize(size_t bytes) {
  char text[32];
  if (bytes >= kMiB && bytes % kMiB == 0) {
    std::snprintf(text, sizeof(text), "%zu MiB", bytes / kMiB);
  } else if (bytes >= kMiB) {
    std::snprintf(text, sizeof(text), "%.2f MiB", static_cast<double>(bytes) / kMiB);
  } else if (bytes >= kKiB && bytes % kKiB == 0) {
    std::snprintf(text, sizeof(text), "%zu KiB", bytes / kKiB);
  } else {
    std::snprintf(text, sizeof(text), "%zu B", bytes);
  }
  return text;
}

// "64K", "4M", "4MiB", "9495552" -> bytes; nullopt when malformed.
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

std::vector<std::string> Split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(separator, start);
    if (end == std::string::npos) end = text.size();
    parts.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

std::optional<int> ParseInt(const std::string& text, int low, int high) {
  if (text.empty() || text.size() > 9) return std::nullopt;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
  }
  int value = std::atoi(text.c_str());
  if (value < low || value > high) return std::nullopt;
  return value;
}

void PrintUsage() {
  std::fprintf(
      stderr,
      "usage: benchmark_averaging [--sizes=4M,16M,64M] [--peers=2,4] [--groups=1] [--rounds=5]\n"
      "                           [--warmup=1] [--encrypt] [--json] [--quick]\n"
      "                           [--part-elements=262144] [--timeout=120] [--grace-ms=0]\n"
      "                           [--no-tcp-reference] [--codec=none] [--bandwidths=B0,B1,..]\n"
      "                           [--netns=NS0@IP0,NS1@IP1,..] [--direct-stream-bytes=N]\n"
      "  --sizes      float32 vector sizes in bytes (suffix K, M, G = KiB, MiB, GiB; multiple of "
      "4)\n"
      "  --peers      group sizes n; each peer is its own process\n"
      "  --groups     independent groups of n peers running their rounds at once (hivemind's\n"
      "               benchmark: 16 peers in groups of 4 = --peers=4 --groups=4)\n"
      "  --rounds     timed rounds per (S, n), after --warmup untimed ones\n"
      "  --encrypt    CURVE on every link (default off: a trusted LAN, as Gloo)\n"
      "  --json       print one JSON object instead of the table\n"
      "  --quick      sizes 1M,4M, peers 2,4, 2 rounds (smoke run)\n"
      "  --timeout    seconds one round may take before it fails\n"
      "  --codec      none, float16, scaled_float16, uniform8, quantile8 or blockwise8: parts and\n"
      "               results travel encoded (results are then checked within 2%%, not exactly)\n"
      "  --bandwidths declared bandwidth of member i of each group (shares are balanced by them)\n"
      "  --netns      worker w runs in network namespace NSw, listening on IPw (needs root; see\n"
      "               benchmarks/benchmark_load_balance.sh)\n"
      "  --direct-stream-bytes  shares of at least this many bytes go on direct streams\n"
      "               (AllReduceOptions::direct_stream_bytes; 0: never; default: the round's)\n");
}

bool ParseFlags(int argc, char** argv, Config& config) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") {
      config.quick = true;
      config.sizes = {1 * kMiB, 4 * kMiB};
      config.peers = {2, 4};
      config.rounds = 2;
    }
  }
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value_of = [&](const std::string& flag) -> std::optional<std::string> {
      if (arg.rfind(flag + "=", 0) != 0) return std::nullopt;
      return arg.substr(flag.size() + 1);
    };
    auto bad = [&](const std::string& why) {
      std::fprintf(stderr, "bad flag '%s': %s\n", arg.c_str(), why.c_str());
      return false;
    };
    if (arg == "--quick") continue;
    if (arg == "--help" || arg == "-h") {
      PrintUsage();
      std::exit(0);
    }
    if (arg == "--encrypt") {
      config.encrypt = true;
    } else if (arg == "--json") {
      config.json = true;
    } else if (arg == "--no-tcp-reference") {
      config.tcp_reference = false;
    } else if (auto sizes = value_of("--sizes")) {
      config.sizes.clear();
      for (const auto& item : Split(*sizes, ',')) {
        auto size = ParseSize(item);
        if (!size || *size == 0 || *size % sizeof(float) != 0 || *size > 1024 * kMiB) {
          return bad("give float32 sizes of 4 B .. 1 GiB, e.g. 4M,16M");
        }
        config.sizes.push_back(*size);
      }
    } else if (auto peers = value_of("--peers")) {
      config.peers.clear();
      for (const auto& item : Split(*peers, ',')) {
        auto n = ParseInt(item, 2, 64);
        if (!n) return bad("give group sizes 2 .. 64, e.g. 2,4,8");
        config.peers.push_back(*n);
      }
    } else if (auto groups = value_of("--groups")) {
      auto value = ParseInt(*groups, 1, 16);
      if (!value) return bad("give 1 .. 16");
      config.groups = *value;
    } else if (auto rounds = value_of("--rounds")) {
      auto value = ParseInt(*rounds, 1, 1000);
      if (!value) return bad("give 1 .. 1000");
      config.rounds = *value;
    } else if (auto warmup = value_of("--warmup")) {
      auto value = ParseInt(*warmup, 0, 100);
      if (!value) return bad("give 0 .. 100");
      config.warmup = *value;
    } else if (auto part = value_of("--part-elements")) {
      auto value = ParseInt(*part, 1, 64 << 20);
      if (!value) return bad("give 1 .. 64Mi elements");
      config.part_elements = static_cast<size_t>(*value);
    } else if (auto direct = value_of("--direct-stream-bytes")) {
      auto value = ParseInt(*direct, 0, 1 << 30);
      if (!value) return bad("give 0 .. 1 GiB in bytes");
      config.direct_stream_bytes = *value;
    } else if (auto timeout = value_of("--timeout")) {
      auto value = ParseInt(*timeout, 1, 3600);
      if (!value) return bad("give 1 .. 3600 seconds");
      config.timeout_s = *value;
    } else if (auto codec = value_of("--codec")) {
      if (!CodecByName(*codec))
        return bad(
            "give none, float16, scaled_float16, uniform8, "
            "quantile8 or blockwise8");
      config.codec = *codec;
    } else if (auto bandwidths = value_of("--bandwidths")) {
      config.bandwidths.clear();
      for (const auto& item : Split(*bandwidths, ',')) {
        char* end = nullptr;
        const double b = std::strtod(item.c_str(), &end);
        if (item.empty() || *end != '\0' || !std::isfinite(b) || b < 0) {
          return bad("give finite bandwidths >= 0, e.g. 100,100,50,50");
        }
        config.bandwidths.push_back(b);
      }
    } else if (auto netns = value_of("--netns")) {
      config.netns.clear();
      for (const auto& item : Split(*netns, ',')) {
        const size_t at = item.find('@');
        if (at == std::string::npos || at == 0 || at + 1 == item.size()) {
          return bad("give NAMESPACE@IP per worker, e.g. hm0@10.77.0.1,hm1@10.77.0.2");
        }
        config.netns.emplace_back(item.substr(0, at), item.substr(at + 1));
      }
    } else if (auto ip = value_of("--listen-ip")) {
      config.listen_ip = *ip;
    } else if (auto grace = value_of("--grace-ms")) {
      auto value = ParseInt(*grace, 0, 600000);
      if (!value) return bad("give 0 .. 600000 ms");
      config.grace_ms = *value;
    } else {
      std::fprintf(stderr, "unknown flag '%s'\n", arg.c_str());
      PrintUsage();
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Line-based messages over a pair of pipes, every read bounded by a deadline.

class Channel {
 public:
  Channel(int read_fd, int write_fd) : read_fd_(read_fd), write_fd_(write_fd) {}
  Channel(Channel&& other) noexcept
      : read_fd_(std::exchange(other.read_fd_, -1)),
        write_fd_(std::exchange(other.write_fd_, -1)),
        buffer_(std::move(other.buffer_)) {}
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  ~Channel() {
    if (read_fd_ >= 0) ::close(read_fd_);
    if (write_fd_ >= 0) ::close(write_fd_);
  }

  Status WriteLine(const std::string& line) {
    std::string data = line + "\n";
    size_t done = 0;
    while (done < data.size()) {
      ssize_t written = ::write(write_fd_, data.data() + done, data.size() - done);
      if (written < 0) {
        if (errno == EINTR) continue;
        return Status(StatusCode::kUnavailable, std::string("pipe write: ") + std::strerror(errno));
      }
      done += static_cast<size_t>(written);
    }
    return Status::Ok();
  }

  // The next line (without its newline); fails at EOF or when `limit` passes first.
  template <class Duration>
  Result<std::string> ReadLine(Duration limit) {
    auto deadline = Clock::now() + limit;
    while (true) {
      size_t newline = buffer_.find('\n');
      if (newline != std::string::npos) {
        std::string line = buffer_.substr(0, newline);
        buffer_.erase(0, newline + 1);
        return line;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) {
        return Status(StatusCode::kDeadlineExceeded, "no message within the time limit");
      }
      pollfd entry{read_fd_, POLLIN, 0};
      int ready = ::poll(&entry, 1, static_cast<int>(std::min<int64_t>(left.count(), 1 << 30)));
      if (ready < 0 && errno != EINTR) {
        return Status(StatusCode::kInternal, std::string("poll: ") + std::strerror(errno));
      }
      if (ready <= 0) continue;
      char chunk[4096];
      ssize_t got = ::read(read_fd_, chunk, sizeof(chunk));
      if (got < 0) {
        if (errno == EINTR) continue;
        return Status(StatusCode::kUnavailable, std::string("pipe read: ") + std::strerror(errno));
      }
      if (got == 0) return Status(StatusCode::kUnavailable, "the other side closed its pipe");
      buffer_.append(chunk, static_cast<size_t>(got));
    }
  }

 private:
  int read_fd_;
  int write_fd_;
  std::string buffer_;
};

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

long MaxRssKib() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

// Input of `member` in round `base`: every value and the mean are exact in float32.
float InputValue(int member, int base, size_t i) {
  return static_cast<float>(member + base) + 0.5f * static_cast<float>(i % 7);
}

float ExpectedMean(int n, int base, size_t i) {
  return static_cast<float>(base) + 0.5f * static_cast<float>(n - 1) +
         0.5f * static_cast<float>(i % 7);
}

// ---------------------------------------------------------------------------------------------
// Worker: one peer. Commands from the parent, one per line:
//   PREP <group id> <elements> <base> <my index> <address 0> ... <address n-1>
//   GO     (runs the round)
//   CHECK  (checks its result; sent once every peer is done, so no check overlaps a round)
//   QUIT
// Replies: ADDR <multiaddr> (at start), READY, DONE <start ns> <end ns> <max rss KiB>, OK,
// FAIL <why>.

std::string OneLine(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  return text;
}

int RunWorker(const Config& config, int read_fd, int write_fd) {
  Channel parent(read_fd, write_fd);
  hm::SetLogLevel(hm::LogLevel::kWarning);
  net::NodeOptions node_options;
  node_options.listen_addresses = {"/ip4/" + config.listen_ip + "/tcp/0"};
  node_options.encryption = config.encrypt;
  auto started = net::Node::Start(node_options);
  if (!started.ok()) {
    (void)parent.WriteLine("FAIL node start: " + OneLine(started.status().ToString()));
    return 1;
  }
  std::unique_ptr<net::Node> node = std::move(started).value();
  avg::AllReduceServiceOptions service_options;
  service_options.grace_period = std::chrono::milliseconds(config.grace_ms);
  auto service = std::make_unique<avg::AllReduceService>(*node, service_options);
  avg::AllReduceOptions round_options;
  round_options.timeout = std::chrono::seconds(config.timeout_s);
  round_options.sender_timeout = std::chrono::milliseconds(config.timeout_s * 1000 / 4);
  round_options.reducer_timeout = std::chrono::milliseconds(config.timeout_s * 1000 / 2);
  round_options.part_elements = config.part_elements;
  if (config.direct_stream_bytes >= 0) {
    round_options.direct_stream_bytes = static_cast<size_t>(config.direct_stream_bytes);
  }

  int exit_code = 0;
  auto shutdown = [&] {
    service.reset();
    node->Shutdown();
  };
  if (!parent.WriteLine("ADDR " + node->visible_address().ToStrings().front()).ok()) {
    shutdown();
    return 1;
  }

  avg::Group group;
  std::vector<float> data;
  avg::SharedMean last;
  int base = 0;
  while (true) {
    auto line = parent.ReadLine(kWorkerIdleLimit);
    if (!line.ok()) {  // the parent is gone
      exit_code = 1;
      break;
    }
    std::istringstream words(*line);
    std::string command;
    words >> command;
    if (command == "QUIT") break;
    if (command == "PREP") {
      size_t elements = 0;
      group = avg::Group{};
      words >> group.id >> elements >> base >> group.my_index;
      std::string address;
      Status parsed;
      while (words >> address) {
        auto peer = net::PeerAddress::Parse(address);
        if (!peer.ok()) {
          parsed = peer.status();
          break;
        }
        avg::GroupMember member;
        member.address = *peer;
        const size_t index = group.members.size();
        if (index < config.bandwidths.size()) member.bandwidth = config.bandwidths[index];
        group.members.push_back(member);
      }
      if (!parsed.ok()) {
        (void)parent.WriteLine("FAIL bad address '" + address + "': " + parsed.ToString());
        continue;
      }
      // On huge pages, as the c10d backend's flat buffer (common/huge_pages.h).
      hivemind::ReserveOnHugePages(data, elements);
      data.resize(elements);
      for (size_t i = 0; i < elements; ++i) data[i] = InputValue(group.my_index, base, i);
      (void)parent.WriteLine("READY");
      continue;
    }
    const avg::CodecSpec codec = *CodecByName(config.codec);
    if (command == "GO") {
      round_options.codecs.clear();
      if (codec.id != avg::CodecId::kNone) round_options.codecs.push_back({0, data.size(), codec});
      int64_t start = NowNanos();
      // Shared: the mean is read where the round keeps it, as the c10d backend and the Python
      // averager do (they copy it into their tensors).
      auto shared = service->AllReduceShared(group, data, 1.0f, round_options);
      int64_t end = NowNanos();
      if (!shared.ok()) {
        (void)parent.WriteLine("FAIL all-reduce: " + OneLine(shared.status().ToString()));
        continue;
      }
      last = std::move(shared).value();
      (void)parent.WriteLine("DONE " + std::to_string(start) + " " + std::to_string(end) + " " +
                             std::to_string(MaxRssKib()));
      continue;
    }
    if (command != "CHECK" || !last.mean) {
      (void)parent.WriteLine("FAIL unexpected command '" + OneLine(*line) + "'");
      continue;
    }
    const avg::AllReduceReport& report = last.report;
    const std::vector<float>& mean = *last.mean;
    std::string problem;
    if (!report.failed_members.empty() || report.takeovers != 0) {
      problem = "a member failed or a share was taken over:";
      for (const auto& failure : report.failures) problem += " " + OneLine(failure) + ";";
    }
    for (const auto& part : report.parts) {
      if (problem.empty() &&
          (part.reduced_by != part.share ||
           part.contributors.size() != static_cast<size_t>(group.members.size()))) {
        problem = "part at " + std::to_string(part.begin) + " reduced by " +
                  std::to_string(part.reduced_by) + " with " +
                  std::to_string(part.contributors.size()) + " contributors";
      }
    }
    int n = static_cast<int>(group.members.size());
    for (size_t i = 0; problem.empty() && i < mean.size(); ++i) {
      const float expected = ExpectedMean(n, base, i);
      const float tolerance = codec.id == avg::CodecId::kNone ? 0.0f : 0.02f * (1 + expected);
      if (!(std::abs(mean[i] - expected) <= tolerance)) {
        char text[160];
        std::snprintf(text, sizeof(text), "wrong mean at element %zu: %.9g, expected %.9g", i,
                      static_cast<double>(mean[i]), static_cast<double>(ExpectedMean(n, base, i)));
        problem = text;
      }
    }
    last.mean.reset();  // back to the pool, as a caller done copying it out would
    (void)parent.WriteLine(problem.empty() ? std::string("OK") : "FAIL " + problem);
  }
  shutdown();
  return exit_code;
}

// ---------------------------------------------------------------------------------------------
// Parent: spawns the workers and runs the rounds.

struct Worker {
  pid_t pid = -1;
  std::unique_ptr<Channel> channel;
  std::string address;
};

class Workers {
 public:
  ~Workers() { Stop(); }

  // fork + exec of this binary with --worker; the pipes are the worker's only link to us.
  Status Spawn(const Config& config, int count, char** argv) {
    if (!config.netns.empty() && config.netns.size() < static_cast<size_t>(count)) {
      return Status(StatusCode::kInvalidArgument,
                    "--netns names " + std::to_string(config.netns.size()) +
                        " namespaces; the run needs one per worker: " + std::to_string(count));
    }
    for (int w = 0; w < count; ++w) {
      int to_worker[2];
      int from_worker[2];
      if (::pipe2(to_worker, O_CLOEXEC) != 0) return Errno("pipe");
      if (::pipe2(from_worker, O_CLOEXEC) != 0) {
        ::close(to_worker[0]);
        ::close(to_worker[1]);
        return Errno("pipe");
      }
      std::vector<std::string> args = {
          argv[0],
          "--worker=" + std::to_string(to_worker[0]) + "," + std::to_string(from_worker[1]),
          "--timeout=" + std::to_string(config.timeout_s),
          "--grace-ms=" + std::to_string(config.grace_ms),
          "--part-elements=" + std::to_string(config.part_elements),
          "--codec=" + config.codec};
      if (config.encrypt) args.push_back("--encrypt");
      if (config.direct_stream_bytes >= 0) {
        args.push_back("--direct-stream-bytes=" + std::to_string(config.direct_stream_bytes));
      }
      if (!config.bandwidths.empty()) {
        std::ostringstream bandwidths;
        bandwidths.precision(17);  // the workers must declare exactly what the parent was given
        for (size_t i = 0; i < config.bandwidths.size(); ++i) {
          bandwidths << (i ? "," : "") << config.bandwidths[i];
        }
        args.push_back("--bandwidths=" + bandwidths.str());
      }
      std::string netns_path;
      if (!config.netns.empty()) {
        netns_path = "/var/run/netns/" + config.netns[w].first;
        args.push_back("--listen-ip=" + config.netns[w].second);
      }
      std::vector<char*> raw;
      for (auto& arg : args) raw.push_back(arg.data());
      raw.push_back(nullptr);
      pid_t pid = ::fork();
      if (pid < 0) return Errno("fork");
      if (pid == 0) {
        // The worker keeps its two pipe ends (the close-on-exec flag off); every other pipe closes.
        ::fcntl(to_worker[0], F_SETFD, 0);
        ::fcntl(from_worker[1], F_SETFD, 0);
        if (!netns_path.empty()) {
          const int ns = ::open(netns_path.c_str(), O_RDONLY | O_CLOEXEC);
          if (ns < 0 || ::setns(ns, CLONE_NEWNET) != 0) {
            std::fprintf(stderr, "entering network namespace %s failed: %s\n", netns_path.c_str(),
                         std::strerror(errno));
            ::_exit(127);
          }
        }
        ::execv("/proc/self/exe", raw.data());
        std::fprintf(stderr, "exec of the worker failed: %s\n", std::strerror(errno));
        ::_exit(127);
      }
      ::close(to_worker[0]);
      ::close(from_worker[1]);
      Worker worker;
      worker.pid = pid;
      worker.channel = std::make_unique<Channel>(from_worker[0], to_worker[1]);
      workers_.push_back(std::move(worker));
    }
    for (size_t w = 0; w < workers_.size(); ++w) {
      auto line = workers_[w].channel->ReadLine(kStartupLimit);
      if (!line.ok()) return line.status().WithContext("worker " + std::to_string(w) + " start");
      if (line->rfind("ADDR ", 0) != 0) {
        return Status(StatusCode::kInternal, "worker " + std::to_string(w) + ": " + *line);
      }
      workers_[w].address = line->substr(5);
    }
    return Status::Ok();
  }

  Worker& operator[](size_t i) { return workers_[i]; }

  // Asks every worker to quit and waits, bounded, for each to close its pipe (it does so when it
  // exits); a worker that does not is killed.
  void Stop() {
    for (auto& worker : workers_) {
      if (worker.channel) (void)worker.channel->WriteLine("QUIT");
    }
    for (auto& worker : workers_) {
      if (worker.pid <= 0) continue;
      bool closed = false;
      while (worker.channel) {
        auto line = worker.channel->ReadLine(std::chrono::seconds(10));
        if (line.ok()) continue;  // a late reply of an abandoned round
        closed = line.status().code() == StatusCode::kUnavailable;
        break;
      }
      if (!closed) ::kill(worker.pid, SIGKILL);
      int status = 0;
      ::waitpid(worker.pid, &status, 0);
      worker.pid = -1;
      worker.channel.reset();
    }
    workers_.clear();
  }

 private:
  static Status Errno(const std::string& what) {
    return Status(StatusCode::kInternal, what + ": " + std::strerror(errno));
  }
  std::vector<Worker> workers_;
};

struct RoundTimes {
  std::vector<double> seconds;  // per timed round and group
  long max_rss_kib = 0;
};

// Runs warm-up + timed rounds of `elements` floats in `groups` groups of `n` workers at once.
Result<RoundTimes> RunConfig(const Config& config, Workers& workers, size_t elements, int n,
                             int& round_counter) {
  RoundTimes times;
  auto wait_limit = std::chrono::seconds(config.timeout_s) + std::chrono::seconds(30);
  int total_workers = n * config.groups;
  for (int round = 0; round < config.warmup + config.rounds; ++round) {
    int base = ++round_counter % 64;
    for (int g = 0; g < config.groups; ++g) {
      std::string id = "bench-" + std::to_string(round_counter) + "-" + std::to_string(g);
      std::string addresses;
      for (int m = 0; m < n; ++m) addresses += " " + workers[g * n + m].address;
      for (int m = 0; m < n; ++m) {
        Status sent = workers[g * n + m].channel->WriteLine(
            "PREP " + id + " " + std::to_string(elements) + " " + std::to_string(base) + " " +
            std::to_string(m) + addresses);
        if (!sent.ok()) return sent.WithContext("worker " + std::to_string(g * n + m));
      }
    }
    for (int w = 0; w < total_workers; ++w) {
      auto line = workers[w].channel->ReadLine(kPrepareLimit);
      if (!line.ok()) return line.status().WithContext("worker " + std::to_string(w) + " prepare");
      if (*line != "READY") {
        return Status(StatusCode::kInternal, "worker " + std::to_string(w) + ": " + *line);
      }
    }
    // The barrier: every input is ready; now start them all.
    for (int w = 0; w < total_workers; ++w) {
      Status sent = workers[w].channel->WriteLine("GO");
      if (!sent.ok()) return sent.WithContext("worker " + std::to_string(w));
    }
    std::vector<int64_t> starts(total_workers), ends(total_workers);
    std::string failures;
    for (int w = 0; w < total_workers; ++w) {
      auto line = workers[w].channel->ReadLine(wait_limit);
      if (!line.ok()) {
        failures += "worker " + std::to_string(w) + ": " + line.status().ToString() + "\n";
        continue;
      }
      long rss = 0;
      if (std::sscanf(line->c_str(), "DONE %" SCNd64 " %" SCNd64 " %ld", &starts[w], &ends[w],
                      &rss) != 3) {
        failures += "worker " + std::to_string(w) + ": " + *line + "\n";
        continue;
      }
      times.max_rss_kib = std::max(times.max_rss_kib, rss);
    }
    if (!failures.empty()) return Status(StatusCode::kInternal, "round failed:\n" + failures);
    for (int w = 0; w < total_workers; ++w) {
      Status sent = workers[w].channel->WriteLine("CHECK");
      if (!sent.ok()) return sent.WithContext("worker " + std::to_string(w));
    }
    for (int w = 0; w < total_workers; ++w) {
      auto line = workers[w].channel->ReadLine(kPrepareLimit);
      if (!line.ok()) {
        failures += "worker " + std::to_string(w) + ": " + line.status().ToString() + "\n";
      } else if (*line != "OK") {
        failures += "worker " + std::to_string(w) + ": " + *line + "\n";
      }
    }
    if (!failures.empty()) return Status(StatusCode::kInternal, "wrong result:\n" + failures);
    if (round < config.warmup) continue;
    for (int g = 0; g < config.groups; ++g) {
      int64_t first = starts[g * n];
      int64_t last = ends[g * n];
      for (int m = 0; m < n; ++m) {
        first = std::min(first, starts[g * n + m]);
        last = std::max(last, ends[g * n + m]);
      }
      times.seconds.push_back(static_cast<double>(last - first) / 1e9);
    }
  }
  return times;
}

// ---------------------------------------------------------------------------------------------
// Raw TCP reference: one stream of 4 MiB writes over 127.0.0.1, a sender and a receiver thread.

Result<double> RawTcpGigabytesPerSecond(size_t total_bytes) {
  auto fail = [](const std::string& what) {
    return Status(StatusCode::kUnavailable, what + ": " + std::strerror(errno));
  };
  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener < 0) return fail("socket");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::listen(listener, 1) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    ::close(listener);
    return fail("listen on 127.0.0.1");
  }
  int sender = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sender < 0 || ::connect(sender, reinterpret_cast<sockaddr*>(&address), sizeof(address))) {
    ::close(listener);
    if (sender >= 0) ::close(sender);
    return fail("connect to 127.0.0.1");
  }
  int receiver = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  ::close(listener);
  if (receiver < 0) {
    ::close(sender);
    return fail("accept");
  }
  timeval limit{30, 0};  // bounded blocking: a stuck socket becomes an error
  for (int fd : {sender, receiver}) {
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit));
  }
  constexpr size_t kChunk = 4 * kMiB;
  std::vector<char> out(kChunk, 'x');
  std::vector<char> in(kChunk, 0);
  bool receive_ok = true;
  auto start = Clock::now();
  std::thread receive_thread([&] {
    size_t left = total_bytes;
    while (left > 0) {
      ssize_t got = ::recv(receiver, in.data(), std::min(left, kChunk), 0);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        receive_ok = false;
        return;
      }
      left -= static_cast<size_t>(got);
    }
  });
  bool send_ok = true;
  for (size_t sent = 0; sent < total_bytes && send_ok;) {
    ssize_t wrote = ::send(sender, out.data(), std::min(total_bytes - sent, kChunk), MSG_NOSIGNAL);
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) send_ok = false;
    if (wrote > 0) sent += static_cast<size_t>(wrote);
  }
  if (!send_ok) ::shutdown(receiver, SHUT_RDWR);
  receive_thread.join();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  ::close(sender);
  ::close(receiver);
  if (!send_ok || !receive_ok) return Status(StatusCode::kUnavailable, "raw TCP transfer failed");
  return static_cast<double>(total_bytes) / std::max(seconds, 1e-9) / 1e9;
}

// ---------------------------------------------------------------------------------------------
// Report.

struct Row {
  size_t bytes = 0;
  int n = 0;
  RoundTimes times;
  double median_s = 0;
  double min_s = 0;
  double bus_gbps = 0;  // 2(n-1)/n * S / median
  double tcp_gbps = 0;  // raw TCP reference, 0 when not measured
  double bound_s = 0;   // loopback bound of the round, 0 when not measured
  double bound_fraction = 0;
};

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : (values[mid - 1] + values[mid]) / 2;
}

int ParallelPairs(int n) {
  int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, std::min(n, cores / 2));
}

void PrintJson(const Config& config, const std::vector<Row>& rows, bool ok,
               const std::string& error) {
  std::printf("{\"implementation\": \"hivemind_backend AllReduceService\", \"encrypt\": %s, ",
              config.encrypt ? "true" : "false");
  std::printf("\"groups\": %d, \"warmup\": %d, \"rounds\": %d, \"part_elements\": %zu, ",
              config.groups, config.warmup, config.rounds, config.part_elements);
  std::printf("\"cores\": %u, \"ok\": %s, \"error\": \"", std::thread::hardware_concurrency(),
              ok ? "true" : "false");
  for (char c : error) {
    if (c == '"' || c == '\\') std::putchar('\\');
    std::putchar(c == '\n' ? ' ' : c);
  }
  std::printf("\", \"rows\": [");
  for (size_t r = 0; r < rows.size(); ++r) {
    const Row& row = rows[r];
    std::printf(
        "%s{\"size_bytes\": %zu, \"peers\": %d, \"median_s\": %.6f, \"min_s\": %.6f, "
        "\"bus_gbps\": %.4f, \"tcp_gbps\": %.4f, \"bound_s\": %.6f, \"bound_fraction\": %.4f, "
        "\"max_rss_mib\": %.1f, \"seconds\": [",
        r ? ", " : "", row.bytes, row.n, row.median_s, row.min_s, row.bus_gbps, row.tcp_gbps,
        row.bound_s, row.bound_fraction, static_cast<double>(row.times.max_rss_kib) / 1024);
    for (size_t i = 0; i < row.times.seconds.size(); ++i) {
      std::printf("%s%.6f", i ? ", " : "", row.times.seconds[i]);
    }
    std::printf("]}");
  }
  std::printf("]}\n");
}

void PrintTable(const Config& config, const std::vector<Row>& rows) {
  std::printf("%10s %3s %10s %10s %10s %10s %10s %8s %9s\n", "S", "n", "median ms", "min ms",
              "bus GB/s", "TCP GB/s", "bound ms", "of bound", "RSS/peer");
  std::printf("%s\n", std::string(88, '-').c_str());
  for (const auto& row : rows) {
    char tcp[32] = "-";
    char bound[32] = "-";
    char fraction[32] = "-";
    if (row.tcp_gbps > 0) std::snprintf(tcp, sizeof(tcp), "%.2f", row.tcp_gbps);
    if (row.bound_s > 0) {
      std::snprintf(bound, sizeof(bound), "%.1f", row.bound_s * 1e3);
      std::snprintf(fraction, sizeof(fraction), "%.2f", row.bound_fraction);
    }
    std::printf("%10s %3d %10.1f %10.1f %10.2f %10s %10s %8s %5.0f MiB\n",
                FormatSize(row.bytes).c_str(), row.n, row.median_s * 1e3, row.min_s * 1e3,
                row.bus_gbps, tcp, bound, fraction,
                static_cast<double>(row.times.max_rss_kib) / 1024);
  }
  (void)config;
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  // A worker: --worker=<read fd>,<write fd> first, then the flags it shares with the parent.
  if (argc > 1 && std::string(argv[1]).rfind("--worker=", 0) == 0) {
    auto fds = Split(std::string(argv[1]).substr(9), ',');
    std::vector<char*> rest = {argv[0]};
    for (int i = 2; i < argc; ++i) rest.push_back(argv[i]);
    if (fds.size() != 2 || !ParseFlags(static_cast<int>(rest.size()), rest.data(), config)) {
      return 2;
    }
    return RunWorker(config, std::atoi(fds[0].c_str()), std::atoi(fds[1].c_str()));
  }
  if (!ParseFlags(argc, argv, config)) return 2;
  hm::SetLogLevel(hm::LogLevel::kWarning);
  ::signal(SIGPIPE, SIG_IGN);  // a dead worker turns into a write error, not our death

  if (!config.json) {
    std::printf(
        "hivemind averaging benchmark: butterfly all-reduce (AllReduceService) of a float32 "
        "vector,\n%d group(s) of n peers at once, one process and one net::Node per peer on "
        "127.0.0.1, %s\n%d warm-up + %d timed rounds per row; time = last peer done - first "
        "peer started; bus GB/s = 2(n-1)/n * S / median\n"
        "bound = 2(n-1) * S bytes over loopback at the raw TCP rate (one stream, 4 MiB writes, "
        "measured before each row) x %s\n\n",
        config.groups, config.encrypt ? "CURVE encryption on" : "no encryption", config.warmup,
        config.rounds, "parallel streams the cores allow (<= n)");
    std::fflush(stdout);
  }

  int max_n = *std::max_element(config.peers.begin(), config.peers.end());
  Workers workers;
  std::vector<Row> rows;
  std::string error;
  Status spawned = workers.Spawn(config, max_n * config.groups, argv);
  if (!spawned.ok()) error = "starting the workers: " + spawned.ToString();
  int round_counter = 0;
  for (int n : config.peers) {
    for (size_t bytes : config.sizes) {
      if (!error.empty()) break;
      Row row;
      row.bytes = bytes;
      row.n = n;
      if (config.tcp_reference) {
        // The better of two transfers: the first one also warms the socket buffers up.
        for (int attempt = 0; attempt < 2; ++attempt) {
          auto tcp = RawTcpGigabytesPerSecond(std::clamp(2 * bytes, 64 * kMiB, 512 * kMiB));
          if (tcp.ok()) row.tcp_gbps = std::max(row.tcp_gbps, *tcp);
        }
      }
      if (!config.json) {
        std::fprintf(stderr, "  measuring S = %s, n = %d\n", FormatSize(bytes).c_str(), n);
      }
      auto times = RunConfig(config, workers, bytes / sizeof(float), n, round_counter);
      if (!times.ok()) {
        error = "S = " + FormatSize(bytes) + ", n = " + std::to_string(n) + ": " +
                times.status().ToString();
        break;
      }
      row.times = *times;
      row.median_s = Median(row.times.seconds);
      row.min_s = *std::min_element(row.times.seconds.begin(), row.times.seconds.end());
      double bus_bytes = 2.0 * (n - 1) / n * static_cast<double>(bytes);
      row.bus_gbps = bus_bytes / row.median_s / 1e9;
      if (row.tcp_gbps > 0) {
        double wire_bytes = 2.0 * (n - 1) * static_cast<double>(bytes) * config.groups;
        row.bound_s = wire_bytes / (row.tcp_gbps * 1e9 * ParallelPairs(n * config.groups));
        row.bound_fraction = row.bound_s / row.median_s;
      }
      rows.push_back(row);
    }
  }
  workers.Stop();

  if (config.json) {
    PrintJson(config, rows, error.empty(), error);
  } else {
    PrintTable(config, rows);
  }
  if (!error.empty()) {
    std::fprintf(stderr, "FAILED %s\n", error.c_str());
    return 1;
  }
  return 0;
}
