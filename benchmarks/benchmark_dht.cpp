// DHT benchmark: a swarm of DHT peers in one process, each its own net::Node (real ZeroMQ sockets
// on 127.0.0.1, CURVE encryption on) with a DhtNode on top, running the workload of hivemind's
// benchmarks/benchmark_dht.py with its defaults:
//   - peers start one after another; each bootstraps from up to --initial-peers random earlier
//     peers;
//   - int(--failure-rate × --num-peers) random peers are set aside to be killed; the others do the
//     work, so a killed peer only hurts through routing tables and the replicas it held;
//   - --num-threads workers each run --rounds rounds. One round: a fresh random key; the storing
//     peers (--num-store-peers, random) concurrently store one random subkey/value each under it,
//     expiring --expiration seconds ahead; then, at random points among all the rounds' store
//     phases, one of the set-aside peers is shut down; then the getting peers (--num-get-peers,
//     random) concurrently get the key (latest=true by default). A get succeeds when it returns
//     exactly the subkeys whose store succeeded, each with its value.
// It prints, per operation, count, success rate and latency (mean, p50, p99, max): every single
// store and get from issue to completion, and each round's store and get phase (the concurrent
// operations of one round, wall time), plus peer start-up (node start + bootstrap).
//
//   benchmark_dht [--quick] [--json] [--num-peers=16] [--initial-peers=4] [--rounds=16]
//                 [--num-threads=10] [--num-store-peers=8] [--num-get-peers=8]
//                 [--failure-rate=0.1] [--expiration=300] [--wait-timeout=5] [--latest=true]
//                 [--seed=30]
//
// Low success rates are results, printed like the rest. Exits 1 only on a crash-type problem (the
// swarm cannot be built, or an operation never completes within its bound), 2 on bad flags.
// benchmarks/benchmark_dht.py runs this with --json and compares it with hivemind's DHT.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/future.h"
#include "common/status.h"
#include "dht/clock.h"
#include "dht/dht_node.h"
#include "dht/net_transport.h"
#include "net/node.h"

namespace {

namespace hm = hivemind;
namespace dht = hivemind::dht;
namespace net = hivemind::net;
using SteadyClock = std::chrono::steady_clock;

struct Config {
  int num_peers = 16;
  int initial_peers = 4;
  int rounds = 16;
  int num_threads = 10;
  int num_store_peers = 8;
  int num_get_peers = 8;
  double failure_rate = 0.1;
  double expiration = 300;
  double wait_timeout = 5;  // seconds: deadline of every DHT call (hivemind's wait_timeout)
  bool latest = true;
  uint64_t seed = 30;
  bool quick = false;
  bool json = false;

  void MakeQuick() {
    quick = true;
    rounds = 2;
    num_threads = 2;
  }

  int NumKilled() const { return static_cast<int>(failure_rate * num_peers); }

  // Bound on waiting for one phase of concurrent operations. Every DHT operation ends within the
  // call deadline times the lookup depth; one that is still missing after this is a hang.
  std::chrono::milliseconds PhaseLimit() const {
    return std::chrono::milliseconds(static_cast<int64_t>((20 * wait_timeout + 30) * 1000));
  }
};

void PrintUsage() {
  std::fprintf(
      stderr,
      "usage: benchmark_dht [--quick] [--json] [--num-peers=16] [--initial-peers=4] [--rounds=16]\n"
      "                     [--num-threads=10] [--num-store-peers=8] [--num-get-peers=8]\n"
      "                     [--failure-rate=0.1] [--expiration=300] [--wait-timeout=5]\n"
      "                     [--latest=true] [--seed=30]\n"
      "  --num-peers        DHT peers in the swarm (each its own net::Node on 127.0.0.1)\n"
      "  --initial-peers    each new peer bootstraps from up to this many random earlier peers\n"
      "  --rounds           rounds per worker (one round: a key stored, then read back)\n"
      "  --num-threads      concurrent workers, each running --rounds rounds\n"
      "  --num-store-peers  peers storing one subkey each per round\n"
      "  --num-get-peers    peers getting the key per round\n"
      "  --failure-rate     fraction of peers shut down during the run\n"
      "  --expiration       seconds the stored records live\n"
      "  --wait-timeout     deadline of every DHT call, seconds\n"
      "  --latest           get with latest=true (search until the nearest nodes all answered)\n"
      "  --seed             random seed (peer choice, keys, kill schedule)\n"
      "  --quick            2 workers x 2 rounds (a smoke run of a few seconds)\n"
      "  --json             print one JSON object instead of the table\n");
}

bool ParseBool(const std::string& text, bool& out) {
  if (text == "1" || text == "true" || text == "True" || text == "yes") {
    out = true;
  } else if (text == "0" || text == "false" || text == "False" || text == "no") {
    out = false;
  } else {
    return false;
  }
  return true;
}

bool ParseInt(const std::string& text, int& out) {
  char* end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < 0 || value > 1'000'000) return false;
  out = static_cast<int>(value);
  return true;
}

bool ParseDouble(const std::string& text, double& out) {
  char* end = nullptr;
  double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(value)) return false;
  out = value;
  return true;
}

// Accepts --flag=value and --flag value. Returns false (after printing why) on a bad flag.
bool ParseFlags(int argc, char** argv, Config& config) {
  // --quick first, so that explicit flags override its settings whatever their order.
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") config.MakeQuick();
  }
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--quick") continue;
    if (arg == "--json") {
      config.json = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") {
      PrintUsage();
      std::exit(0);
    }
    std::string name = arg;
    std::optional<std::string> value;
    if (auto eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    auto take_value = [&]() -> std::optional<std::string> {
      if (value) return value;
      if (i + 1 < argc) return std::string(argv[++i]);
      return std::nullopt;
    };
    static const char* const kValueFlags[] = {
        "--num-peers",       "--initial-peers", "--rounds",       "--num-threads",
        "--num-store-peers", "--num-get-peers", "--failure-rate", "--expiration",
        "--wait-timeout",    "--latest",        "--seed"};
    if (std::find(std::begin(kValueFlags), std::end(kValueFlags), name) == std::end(kValueFlags)) {
      std::fprintf(stderr, "benchmark_dht: unknown flag %s\n", arg.c_str());
      PrintUsage();
      return false;
    }
    bool ok = false;
    if (name == "--latest" && !value && (i + 1 >= argc || argv[i + 1][0] == '-')) {
      config.latest = true;  // bare --latest
      ok = true;
    } else if (auto text = take_value()) {
      if (name == "--num-peers") {
        ok = ParseInt(*text, config.num_peers);
      } else if (name == "--initial-peers") {
        ok = ParseInt(*text, config.initial_peers);
      } else if (name == "--rounds") {
        ok = ParseInt(*text, config.rounds);
      } else if (name == "--num-threads") {
        ok = ParseInt(*text, config.num_threads);
      } else if (name == "--num-store-peers") {
        ok = ParseInt(*text, config.num_store_peers);
      } else if (name == "--num-get-peers") {
        ok = ParseInt(*text, config.num_get_peers);
      } else if (name == "--failure-rate") {
        ok = ParseDouble(*text, config.failure_rate);
      } else if (name == "--expiration") {
        ok = ParseDouble(*text, config.expiration);
      } else if (name == "--wait-timeout") {
        ok = ParseDouble(*text, config.wait_timeout);
      } else if (name == "--latest") {
        ok = ParseBool(*text, config.latest);
      } else if (name == "--seed") {
        char* end = nullptr;
        config.seed = std::strtoull(text->c_str(), &end, 10);
        ok = !text->empty() && *end == '\0';
      }
    }
    if (!ok) {
      std::fprintf(stderr, "benchmark_dht: bad or missing value for %s\n", name.c_str());
      return false;
    }
  }
  const char* problem = nullptr;
  if (config.num_peers < 2) {
    problem = "--num-peers must be at least 2";
  } else if (config.initial_peers < 1) {
    problem = "--initial-peers must be at least 1";
  } else if (config.rounds < 1 || config.num_threads < 1) {
    problem = "--rounds and --num-threads must be at least 1";
  } else if (config.num_store_peers < 1 || config.num_get_peers < 1) {
    problem = "--num-store-peers and --num-get-peers must be at least 1";
  } else if (config.failure_rate < 0 || config.NumKilled() >= config.num_peers) {
    problem = "--failure-rate must be in [0, 1) and leave at least one peer alive";
  } else if (config.expiration <= 0 || config.expiration > 24 * 3600) {
    problem = "--expiration must be in (0, 86400] seconds (the DHT caps records at 24 h)";
  } else if (config.wait_timeout <= 0 || config.wait_timeout > 600) {
    problem = "--wait-timeout must be in (0, 600] seconds";
  }
  if (problem) {
    std::fprintf(stderr, "benchmark_dht: %s\n", problem);
    return false;
  }
  return true;
}

// One process-local peer: a transport node and the DHT node on top of it.
struct Peer {
  std::unique_ptr<net::Node> node;
  std::shared_ptr<dht::NetDhtTransport> transport;
  std::shared_ptr<dht::DhtNode> dht;
};

double MillisSince(SteadyClock::time_point start, SteadyClock::time_point end) {
  return std::chrono::duration<double, std::milli>(end - start).count();
}

// Latencies and outcomes of one kind of operation.
struct OpStats {
  std::vector<double> latencies_ms;
  size_t ok = 0;
  std::map<std::string, size_t> errors;  // failure reason -> count

  void Add(double latency_ms, bool success, const std::string& error = "") {
    latencies_ms.push_back(latency_ms);
    if (success) {
      ++ok;
    } else {
      ++errors[error.empty() ? "unknown" : error];
    }
  }
  void Merge(const OpStats& other) {
    latencies_ms.insert(latencies_ms.end(), other.latencies_ms.begin(), other.latencies_ms.end());
    ok += other.ok;
    for (const auto& [reason, count] : other.errors) errors[reason] += count;
  }
};

struct Summary {
  size_t count = 0;
  size_t ok = 0;
  double mean = 0, p50 = 0, p99 = 0, max = 0;
};

// Nearest-rank percentile (benchmark_dht_hivemind.py computes the same).
double Percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

Summary Summarize(const OpStats& stats) {
  Summary summary;
  std::vector<double> sorted = stats.latencies_ms;
  std::sort(sorted.begin(), sorted.end());
  summary.count = sorted.size();
  summary.ok = stats.ok;
  if (sorted.empty()) return summary;
  double sum = 0;
  for (double value : sorted) sum += value;
  summary.mean = sum / static_cast<double>(sorted.size());
  summary.p50 = Percentile(sorted, 0.50);
  summary.p99 = Percentile(sorted, 0.99);
  summary.max = sorted.back();
  return summary;
}

// Counts down as operations complete, remembering when each one did; the waiter waits with a
// deadline. Shared with the completion callbacks, which may outlive a wait that gave up.
class CompletionLatch {
 public:
  explicit CompletionLatch(size_t count) : done_at_(count), remaining_(count) {}

  void Complete(size_t index) {
    std::lock_guard<std::mutex> lock(mutex_);
    done_at_[index] = SteadyClock::now();
    --remaining_;
    if (remaining_ == 0) cv_.notify_all();
  }
  // True when every operation completed before `deadline`.
  bool WaitUntil(SteadyClock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_until(lock, deadline, [&] { return remaining_ == 0; });
  }
  std::optional<SteadyClock::time_point> DoneAt(size_t index) {
    std::lock_guard<std::mutex> lock(mutex_);
    return done_at_[index];
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::optional<SteadyClock::time_point>> done_at_;
  size_t remaining_;
};

// Shuts the set-aside peers down, one at each scheduled tick (a tick = one finished store phase),
// at ticks drawn at random among all of the run's store phases.
class PeerKiller {
 public:
  PeerKiller(std::vector<Peer*> victims, size_t total_ticks, std::mt19937_64& rng)
      : victims_(std::move(victims)) {
    std::vector<size_t> ticks(total_ticks);
    for (size_t i = 0; i < total_ticks; ++i) ticks[i] = i;
    std::shuffle(ticks.begin(), ticks.end(), rng);
    ticks.resize(std::min(victims_.size(), total_ticks));
    std::sort(ticks.begin(), ticks.end());
    schedule_ = std::move(ticks);
    std::shuffle(victims_.begin(), victims_.end(), rng);
  }

  void Tick() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (next_ < schedule_.size() && tick_ == schedule_[next_]) {
      victims_[next_]->node->Shutdown();  // fails its pending calls; it answers nobody from now on
      ++next_;
    }
    ++tick_;
  }
  size_t killed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return next_;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<Peer*> victims_;
  std::vector<size_t> schedule_;
  size_t tick_ = 0;
  size_t next_ = 0;
};

std::string RandomHex(std::mt19937_64& rng) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text(32, '0');
  for (size_t i = 0; i < text.size(); i += 16) {
    uint64_t bits = rng();
    for (size_t j = 0; j < 16; ++j) text[i + j] = kDigits[(bits >> (4 * j)) & 0xf];
  }
  return text;
}

std::vector<Peer*> Sample(const std::vector<Peer*>& from, size_t count, std::mt19937_64& rng) {
  std::vector<Peer*> pool = from;
  count = std::min(count, pool.size());
  for (size_t i = 0; i < count; ++i) {
    std::uniform_int_distribution<size_t> pick(i, pool.size() - 1);
    std::swap(pool[i], pool[pick(rng)]);
  }
  pool.resize(count);
  return pool;
}

struct WorkerResult {
  OpStats store, get, store_phase, get_phase;
  size_t get_requests = 0;  // find requests sent by successful gets
  bool hung = false;
};

class Benchmark {
 public:
  explicit Benchmark(Config config) : config_(std::move(config)) {}
  ~Benchmark() { Stop(); }

  // Starts the peers one after another; each bootstraps from random earlier ones. False (after
  // printing why) when the swarm cannot be built.
  bool StartSwarm(std::mt19937_64& rng) {
    std::vector<Peer*> started;
    for (int i = 0; i < config_.num_peers; ++i) {
      const auto start = SteadyClock::now();
      net::NodeOptions options;
      options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};  // encryption stays on (the default)
      auto node = net::Node::Start(options);
      if (!node.ok()) {
        std::fprintf(stderr, "benchmark_dht: peer %d did not start: %s\n", i,
                     node.status().ToString().c_str());
        return false;
      }
      auto peer = std::make_unique<Peer>();
      peer->node = std::move(node).value();
      dht::NetTransportOptions transport_options;
      transport_options.call_timeout =
          std::chrono::milliseconds(static_cast<int64_t>(config_.wait_timeout * 1000));
      peer->transport = std::make_shared<dht::NetDhtTransport>(peer->node.get(), transport_options);
      dht::DhtOptions dht_options;
      dht_options.random_seed = rng();
      peer->dht = dht::DhtNode::Create(dht::NetDhtTransport::SelfContact(*peer->node),
                                       peer->transport, clock_, dht_options);
      peer->transport->Serve(peer->dht);
      bool ok = true;
      std::string error;
      if (!started.empty()) {
        std::vector<dht::Contact> initial;
        for (Peer* neighbor : Sample(started, config_.initial_peers, rng)) {
          initial.push_back(neighbor->dht->self());
        }
        auto joined = peer->dht->Bootstrap(std::move(initial)).WaitFor(config_.PhaseLimit());
        if (!joined) {
          std::fprintf(stderr, "benchmark_dht: peer %d: bootstrap did not end within %.0f s\n", i,
                       config_.PhaseLimit().count() / 1000.0);
          return false;
        }
        ok = joined->ok();
        if (!ok) error = joined->status().ToString();
      }
      startup_.Add(MillisSince(start, SteadyClock::now()), ok, error);
      if (!ok) {
        std::fprintf(stderr, "benchmark_dht: peer %d could not join the swarm: %s\n", i,
                     error.c_str());
        return false;
      }
      peers_.push_back(std::move(peer));
      started.push_back(peers_.back().get());
    }
    return true;
  }

  void Run(std::mt19937_64& rng) {
    std::vector<Peer*> all;
    for (auto& peer : peers_) all.push_back(peer.get());
    std::vector<Peer*> shuffled = Sample(all, all.size(), rng);
    const size_t num_killed = static_cast<size_t>(config_.NumKilled());
    std::vector<Peer*> victims(shuffled.begin(), shuffled.begin() + num_killed);
    std::vector<Peer*> workers_peers(shuffled.begin() + num_killed, shuffled.end());
    killer_ = std::make_unique<PeerKiller>(
        victims, static_cast<size_t>(config_.num_threads) * config_.rounds, rng);

    results_.assign(config_.num_threads, WorkerResult{});
    std::vector<uint64_t> seeds;
    for (int w = 0; w < config_.num_threads; ++w) seeds.push_back(rng());
    const auto start = SteadyClock::now();
    std::vector<std::thread> threads;
    for (int w = 0; w < config_.num_threads; ++w) {
      threads.emplace_back([this, w, seed = seeds[w], &workers_peers] {
        std::mt19937_64 worker_rng(seed);
        for (int r = 0; r < config_.rounds && !results_[w].hung; ++r) {
          RunRound(workers_peers, worker_rng, results_[w]);
        }
      });
    }
    for (auto& thread : threads) thread.join();
    total_seconds_ = MillisSince(start, SteadyClock::now()) / 1000.0;
  }

  // Shuts every node down first (failing pending calls), then drops the DHT nodes.
  void Stop() {
    for (auto& peer : peers_) peer->node->Shutdown();
    for (auto& peer : peers_) {
      peer->dht.reset();
      peer->transport.reset();
      peer->node.reset();
    }
    peers_.clear();
  }

  // Prints the results; returns the exit code.
  int Report() const {
    WorkerResult total;
    for (const auto& result : results_) {
      total.store.Merge(result.store);
      total.get.Merge(result.get);
      total.store_phase.Merge(result.store_phase);
      total.get_phase.Merge(result.get_phase);
      total.get_requests += result.get_requests;
      total.hung = total.hung || result.hung;
    }
    const std::vector<std::pair<std::string, const OpStats*>> rows = {
        {"peer_start", &startup_},
        {"store", &total.store},
        {"get", &total.get},
        {"store_phase", &total.store_phase},
        {"get_phase", &total.get_phase}};
    const double requests_per_get =
        total.get.ok ? static_cast<double>(total.get_requests) / total.get.ok : 0;
    if (config_.json) {
      PrintJson(rows, requests_per_get, total.hung);
    } else {
      PrintTable(rows, requests_per_get, total.hung);
    }
    return total.hung ? 1 : 0;
  }

 private:
  void RunRound(const std::vector<Peer*>& peers, std::mt19937_64& rng, WorkerResult& result) {
    const std::string key = RandomHex(rng);
    const auto storers = Sample(peers, config_.num_store_peers, rng);
    std::vector<std::string> subkeys, values;
    for (size_t i = 0; i < storers.size(); ++i) {
      subkeys.push_back(RandomHex(rng));
      values.push_back(RandomHex(rng));
    }

    // Store phase: every storing peer stores its subkey at once.
    const auto store_start = SteadyClock::now();
    auto store_latch = std::make_shared<CompletionLatch>(storers.size());
    std::vector<hm::Future<dht::StoreOutcome>> stores;
    for (size_t i = 0; i < storers.size(); ++i) {
      stores.push_back(
          storers[i]->dht->Store(key, values[i], clock_->Now() + config_.expiration, subkeys[i]));
      stores.back().OnReady([store_latch, i](const auto&) { store_latch->Complete(i); });
    }
    bool complete = store_latch->WaitUntil(store_start + config_.PhaseLimit());
    const auto store_end = SteadyClock::now();
    std::map<std::string, std::string> stored;  // subkey -> value, for the stores that succeeded
    for (size_t i = 0; i < storers.size(); ++i) {
      auto done_at = store_latch->DoneAt(i);
      if (!done_at) {
        result.store.Add(MillisSince(store_start, store_end), false, "no result (hang)");
        continue;
      }
      const auto& outcome = stores[i].Wait();  // ready: its callback has run
      std::string error;
      if (!outcome.ok()) {
        error = outcome.status().ToString();
      } else if (!outcome->status.ok()) {
        error = outcome->status.ToString();
      } else {
        stored[subkeys[i]] = values[i];
      }
      result.store.Add(MillisSince(store_start, *done_at), error.empty(), error);
    }
    result.store_phase.Add(MillisSince(store_start, store_end), complete,
                           complete ? "" : "no result (hang)");
    if (!complete) {
      result.hung = true;
      return;
    }
    killer_->Tick();

    // Get phase: every getting peer reads the key at once.
    const auto getters = Sample(peers, config_.num_get_peers, rng);
    const auto get_start = SteadyClock::now();
    auto get_latch = std::make_shared<CompletionLatch>(getters.size());
    std::vector<hm::Future<dht::GetOutcome>> gets;
    for (size_t i = 0; i < getters.size(); ++i) {
      gets.push_back(getters[i]->dht->Get(key, config_.latest));
      gets.back().OnReady([get_latch, i](const auto&) { get_latch->Complete(i); });
    }
    complete = get_latch->WaitUntil(get_start + config_.PhaseLimit());
    const auto get_end = SteadyClock::now();
    for (size_t i = 0; i < getters.size(); ++i) {
      auto done_at = get_latch->DoneAt(i);
      if (!done_at) {
        result.get.Add(MillisSince(get_start, get_end), false, "no result (hang)");
        continue;
      }
      const auto& outcome = gets[i].Wait();
      std::string error;
      if (!outcome.ok()) {
        error = outcome.status().ToString();
      } else if (!outcome->value) {
        error = "key not found";
      } else {
        const auto& found = outcome->value->dictionary();
        if (found.size() != stored.size()) {
          error = "wrong number of subkeys";
        } else {
          for (const auto& [subkey, value] : stored) {
            auto it = found.find(subkey);
            if (it == found.end() || it->second.value != value) {
              error = "wrong or missing subkey value";
              break;
            }
          }
        }
        if (error.empty()) result.get_requests += static_cast<size_t>(outcome->requests);
      }
      result.get.Add(MillisSince(get_start, *done_at), error.empty(), error);
    }
    result.get_phase.Add(MillisSince(get_start, get_end), complete,
                         complete ? "" : "no result (hang)");
    if (!complete) result.hung = true;
  }

  void PrintTable(const std::vector<std::pair<std::string, const OpStats*>>& rows,
                  double requests_per_get, bool hung) const {
    std::printf(
        "DHT benchmark (hivemind_backend, real sockets on 127.0.0.1, encryption on)\n"
        "  %d peers (each bootstraps from up to %d), %d workers x %d rounds, %d storing + %d "
        "getting peers per round,\n"
        "  failure rate %.2f (%zu of %d peers killed), expiration %.0f s, latest=%s, call "
        "timeout %.1f s, seed %llu\n\n",
        config_.num_peers, config_.initial_peers, config_.num_threads, config_.rounds,
        config_.num_store_peers, config_.num_get_peers, config_.failure_rate, killer_->killed(),
        config_.num_peers, config_.expiration, config_.latest ? "true" : "false",
        config_.wait_timeout, static_cast<unsigned long long>(config_.seed));
    std::printf("%-12s %7s %9s %10s %10s %10s %10s\n", "operation", "count", "success", "mean ms",
                "p50 ms", "p99 ms", "max ms");
    for (const auto& [name, stats] : rows) {
      Summary s = Summarize(*stats);
      std::printf("%-12s %7zu %8.1f%% %10.2f %10.2f %10.2f %10.2f\n", name.c_str(), s.count,
                  s.count ? 100.0 * s.ok / s.count : 0.0, s.mean, s.p50, s.p99, s.max);
    }
    std::printf(
        "\nstore/get: one operation, issue to completion; store_phase/get_phase: one round's "
        "concurrent\noperations, wall time; peer_start: node start + bootstrap.\n");
    std::printf("find requests per successful get: %.2f; workload time: %.2f s\n", requests_per_get,
                total_seconds_);
    std::printf("operations that took at least 0.9 x the call timeout (waited out a dead peer?):");
    for (const auto& [name, stats] : rows) std::printf(" %s %zu", name.c_str(), SlowCount(*stats));
    std::printf("\n");
    for (const auto& [name, stats] : rows) {
      for (const auto& [reason, count] : stats->errors) {
        std::printf("  %s failed %zux: %s\n", name.c_str(), count, reason.c_str());
      }
    }
    if (hung) std::printf("ERROR: an operation did not complete within its bound (a hang)\n");
  }

  // Operations that took about a whole call timeout or longer.
  size_t SlowCount(const OpStats& stats) const {
    const double threshold_ms = 0.9 * config_.wait_timeout * 1000;
    return static_cast<size_t>(std::count_if(stats.latencies_ms.begin(), stats.latencies_ms.end(),
                                             [&](double ms) { return ms >= threshold_ms; }));
  }

  static std::string JsonString(const std::string& text) {
    std::string out = "\"";
    for (unsigned char c : text) {
      if (c == '"' || c == '\\') {
        out += '\\';
        out += static_cast<char>(c);
      } else if (c < 0x20) {
        char escaped[8];
        std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
        out += escaped;
      } else {
        out += static_cast<char>(c);
      }
    }
    return out + "\"";
  }

  void PrintJson(const std::vector<std::pair<std::string, const OpStats*>>& rows,
                 double requests_per_get, bool hung) const {
    std::printf("{\"implementation\": \"hivemind_backend\", \"config\": {");
    std::printf(
        "\"num_peers\": %d, \"initial_peers\": %d, \"rounds\": %d, \"num_threads\": %d, "
        "\"num_store_peers\": %d, \"num_get_peers\": %d, \"failure_rate\": %g, "
        "\"expiration\": %g, \"wait_timeout\": %g, \"latest\": %s, \"seed\": %llu},\n",
        config_.num_peers, config_.initial_peers, config_.rounds, config_.num_threads,
        config_.num_store_peers, config_.num_get_peers, config_.failure_rate, config_.expiration,
        config_.wait_timeout, config_.latest ? "true" : "false",
        static_cast<unsigned long long>(config_.seed));
    std::printf(" \"peers_killed\": %zu, \"total_seconds\": %.4f, \"hung\": %s,\n",
                killer_->killed(), total_seconds_, hung ? "true" : "false");
    std::printf(" \"requests_per_get\": %.3f,\n \"operations\": {", requests_per_get);
    bool first = true;
    for (const auto& [name, stats] : rows) {
      Summary s = Summarize(*stats);
      std::printf(
          "%s\n  %s: {\"count\": %zu, \"ok\": %zu, \"success_rate\": %.6f, \"mean_ms\": %.4f, "
          "\"p50_ms\": %.4f, \"p99_ms\": %.4f, \"max_ms\": %.4f, \"slow\": %zu, \"errors\": {",
          first ? "" : ",", JsonString(name).c_str(), s.count, s.ok,
          s.count ? static_cast<double>(s.ok) / s.count : 0.0, s.mean, s.p50, s.p99, s.max,
          SlowCount(*stats));
      bool first_error = true;
      for (const auto& [reason, count] : stats->errors) {
        std::printf("%s%s: %zu", first_error ? "" : ", ", JsonString(reason).c_str(), count);
        first_error = false;
      }
      std::printf("}}");
      first = false;
    }
    std::printf("}}\n");
  }

  Config config_;
  std::shared_ptr<const dht::Clock> clock_ = std::make_shared<dht::SystemClock>();
  std::vector<std::unique_ptr<Peer>> peers_;
  std::unique_ptr<PeerKiller> killer_;
  OpStats startup_;
  std::vector<WorkerResult> results_;
  double total_seconds_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  Config config;
  if (!ParseFlags(argc, argv, config)) return 2;
  std::mt19937_64 rng(config.seed);
  Benchmark benchmark(config);
  if (!benchmark.StartSwarm(rng)) return 1;
  benchmark.Run(rng);
  benchmark.Stop();
  return benchmark.Report();
}
