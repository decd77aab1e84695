#include "averaging/matchmaking_sim_world.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <queue>
#include <random>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/worker_pool.h"

namespace hivemind::averaging {
namespace {

using SteadyClock = std::chrono::steady_clock;

struct SimPeer {
  net::PeerId id;
  std::vector<std::string> addresses;
  bool client_mode = false;
  std::atomic<bool> alive{true};

  std::mutex mutex;  // handlers, served
  std::map<std::string, net::UnaryHandler> handlers;
  std::map<std::string, uint64_t> served;
};

// A task due at a time; ties keep the order of scheduling.
struct Timed {
  SteadyClock::time_point due;
  uint64_t sequence = 0;
  std::function<void()> task;
  bool operator>(const Timed& other) const {
    return due != other.due ? due > other.due : sequence > other.sequence;
  }
};

}  // namespace

struct SimMatchmakingWorld::Core {
  using Dictionary = std::map<std::string, dht::DhtRunnerEntry>;

  explicit Core(SimMatchmakingWorldOptions opts)
      : options(opts),
        id_rng(opts.seed),
        latency_rng(opts.seed ^ 0x9e3779b97f4a7c15ull),
        pool(std::max(1, opts.threads)) {
    timer_thread = std::thread([this] { RunTimers(); });
  }
  ~Core() { Shutdown(); }

  // ---- scheduling: one timer thread hands due tasks to the pool ----

  void After(std::chrono::microseconds delay, std::function<void()> task) {
    if (delay.count() > 0) {
      std::lock_guard<std::mutex> lock(timer_mutex);
      if (!timers_stopped) {
        timers.push(Timed{SteadyClock::now() + delay, next_sequence++, std::move(task)});
        timer_wake.notify_one();
        return;
      }
    }
    pool.Post(std::move(task));  // runs inline once the pool is shut down
  }

  void RunTimers() {
    std::unique_lock<std::mutex> lock(timer_mutex);
    for (;;) {
      if (timers_stopped) return;
      if (timers.empty()) {
        timer_wake.wait(lock);
        continue;
      }
      const auto due = timers.top().due;
      if (SteadyClock::now() < due) {
        timer_wake.wait_until(lock, due);
        continue;
      }
      auto task = std::move(const_cast<Timed&>(timers.top()).task);
      timers.pop();
      lock.unlock();
      pool.Post(std::move(task));
      lock.lock();
    }
  }

  std::chrono::microseconds Latency() {
    if (options.max_latency <= options.min_latency) return options.min_latency;
    std::lock_guard<std::mutex> lock(latency_mutex);
    std::uniform_int_distribution<int64_t> pick(options.min_latency.count(),
                                                options.max_latency.count());
    return std::chrono::microseconds(pick(latency_rng));
  }

  // ---- what tests wait on ----

  void Notify() {
    {
      std::lock_guard<std::mutex> lock(event_mutex);
      ++events;
    }
    event_cv.notify_all();
  }

  // ---- peers ----

  std::shared_ptr<SimPeer> Find(const net::PeerId& id) const {
    std::lock_guard<std::mutex> lock(peers_mutex);
    auto it = peers.find(id);
    return it == peers.end() ? nullptr : it->second;
  }

  bool Running(const SimPeer& peer) const { return peer.alive.load() && !closed.load(); }

  // ---- the ideal DHT ----

  std::shared_ptr<const Dictionary> Snapshot(const std::string& key) const {
    std::lock_guard<std::mutex> lock(dht_mutex);
    auto it = dht.find(key);
    return it == dht.end() ? nullptr : it->second;
  }

  Future<dht::DhtRunnerStoreResult> Store(const SimPeer& from, const std::string& key,
                                          const std::string& subkey, std::string value,
                                          dht::DhtTime expiration) {
    if (!Running(from)) {
      return Future<dht::DhtRunnerStoreResult>::Ready(
          Status(StatusCode::kFailedPrecondition, "the DHT of this peer was shut down"));
    }
    const dht::DhtTime now = dht::DhtNow();
    if (!std::isfinite(expiration) || expiration <= now) {
      return Future<dht::DhtRunnerStoreResult>::Ready(
          Status(StatusCode::kInvalidArgument, "record already expired or not finite"));
    }
    dht::DhtRunnerStoreResult result;
    {
      std::lock_guard<std::mutex> lock(dht_mutex);
      auto& snapshot = dht[key];
      const dht::DhtRunnerEntry* stored = nullptr;
      if (snapshot) {
        auto it = snapshot->find(subkey);
        if (it != snapshot->end() && it->second.expiration > now) stored = &it->second;
      }
      // The DHT's rule: a later expiration replaces; an identical record is accepted again.
      if (!stored || stored->expiration < expiration) {
        auto next = std::make_shared<Dictionary>();
        if (snapshot) {
          for (const auto& [name, entry] : *snapshot) {
            if (entry.expiration > now) next->emplace(name, entry);
          }
        }
        (*next)[subkey] = dht::DhtRunnerEntry{std::move(value), expiration};
        snapshot = std::move(next);
        result.replicas = 1;
      } else if (stored->expiration == expiration && stored->value == value) {
        result.replicas = 1;
      } else {
        result.status = Status(StatusCode::kFailedPrecondition,
                               "a record with a later expiration is already stored under this key");
      }
    }
    Notify();
    return Future<dht::DhtRunnerStoreResult>::Ready(std::move(result));
  }

  Future<std::optional<dht::DhtRunnerValue>> Get(const SimPeer& from, const std::string& key) {
    if (!Running(from)) {
      return Future<std::optional<dht::DhtRunnerValue>>::Ready(
          Status(StatusCode::kFailedPrecondition, "the DHT of this peer was shut down"));
    }
    const dht::DhtTime now = dht::DhtNow();
    dht::DhtRunnerValue value;
    // Copied outside the lock: with a thousand peers reading a thousand declarations each, one
    // lock held for the copies made every reader (and every call) queue behind the others.
    if (auto snapshot = Snapshot(key)) {
      for (const auto& entry : *snapshot) {
        if (entry.second.expiration > now) value.dictionary.insert(value.dictionary.end(), entry);
      }
    }
    std::optional<dht::DhtRunnerValue> found;
    if (value.is_dictionary()) found = std::move(value);
    return Future<std::optional<dht::DhtRunnerValue>>::Ready(std::move(found));
  }

  // ---- calls ----

  Future<net::Message> Call(const SimPeer& from, const net::PeerId& to, const std::string& method,
                            net::Message request, std::chrono::milliseconds timeout) {
    if (closed.load()) {
      return Future<net::Message>::Ready(Status(StatusCode::kCancelled, "the world is shut down"));
    }
    if (!from.alive.load()) {
      return Future<net::Message>::Ready(
          Status(StatusCode::kCancelled, "this peer was killed: its node is down"));
    }
    Promise<net::Message> reply;
    auto cancelled = std::make_shared<std::atomic<bool>>(false);
    // The canceller and the deadline both hold the promise; its first result clears the canceller,
    // and the deadline task runs in any case, so no reference outlives the call for long.
    reply.SetCanceller([reply, cancelled] {
      cancelled->store(true);
      reply.Set(Status(StatusCode::kCancelled, "the caller cancelled the call"));
    });
    const auto deadline = SteadyClock::now() + timeout;
    After(std::chrono::duration_cast<std::chrono::microseconds>(timeout), [this, reply, cancelled,
                                                                           timeout] {
      const bool expired =
          closed.load()
              ? reply.Set(Status(StatusCode::kCancelled, "the world is shut down"))
              : reply.Set(Status(StatusCode::kDeadlineExceeded,
                                 "no reply within " + std::to_string(timeout.count()) + " ms"));
      if (expired) cancelled->store(true);
    });
    After(Latency(), [this, caller = from.id, to, method, request = std::move(request), reply,
                      cancelled, deadline]() mutable {
      Deliver(caller, to, method, std::move(request), reply, cancelled, deadline);
    });
    return reply.future();
  }

  void Deliver(const net::PeerId& caller, const net::PeerId& to, const std::string& method,
               net::Message request, const Promise<net::Message>& reply,
               const std::shared_ptr<std::atomic<bool>>& cancelled,
               SteadyClock::time_point deadline) {
    if (cancelled->load()) return;
    if (closed.load()) {
      reply.Set(Status(StatusCode::kCancelled, "the world is shut down"));
      return;
    }
    auto callee = Find(to);
    net::UnaryHandler handler;
    if (callee && callee->alive.load()) {
      std::lock_guard<std::mutex> lock(callee->mutex);
      auto it = callee->handlers.find(method);
      if (it != callee->handlers.end()) {
        handler = it->second;
        ++callee->served[method];
      }
    }
    if (!handler) {
      // Unreachable peers and unknown methods answer after a round trip, as over the network.
      Status why = !callee || !callee->alive.load()
                       ? Status(StatusCode::kUnavailable, "peer " + to.ShortString() + " is down")
                       : Status(StatusCode::kNotFound, "no method '" + method + "'");
      After(Latency(), [reply, why] { reply.Set(why); });
      Notify();
      return;
    }
    delivered.fetch_add(1);
    net::CallContext context;
    context.peer = caller;
    context.method = method;
    context.deadline = deadline;
    context.cancelled = cancelled;
    net::Responder respond = [this, callee, reply](Result<net::Message> answer) {
      // A peer killed before it answered never answers: the caller learns it like over a broken
      // connection.
      if (!callee->alive.load()) {
        answer = Status(StatusCode::kUnavailable,
                        "peer " + callee->id.ShortString() + " died before it answered");
      }
      After(Latency(), [reply, answer = std::move(answer)] { reply.Set(answer); });
    };
    try {
      handler(context, std::move(request), std::move(respond));
    } catch (const std::exception& error) {
      reply.Set(Status(StatusCode::kInternal, std::string("handler threw: ") + error.what()));
    }
    Notify();
  }

  void Shutdown() {
    if (closed.exchange(true)) return;
    std::vector<std::function<void()>> pending;
    {
      std::lock_guard<std::mutex> lock(timer_mutex);
      timers_stopped = true;
      while (!timers.empty()) {
        pending.push_back(std::move(const_cast<Timed&>(timers.top()).task));
        timers.pop();
      }
    }
    timer_wake.notify_all();
    if (timer_thread.joinable()) timer_thread.join();
    // Every pending task sees `closed`: deliveries and deadlines fail their calls with CANCELLED.
    for (auto& task : pending) pool.Post(std::move(task));
    pool.Shutdown();
    Notify();
  }

  const SimMatchmakingWorldOptions options;
  std::atomic<bool> closed{false};
  std::atomic<uint64_t> delivered{0};

  mutable std::mutex peers_mutex;  // peers, id_rng, next_index
  std::unordered_map<net::PeerId, std::shared_ptr<SimPeer>> peers;
  std::mt19937_64 id_rng;
  uint32_t next_index = 0;

  std::mutex latency_mutex;
  std::mt19937_64 latency_rng;

  // Copy on write: a store (two per search) copies the key's dictionary, a read (one per
  // poll_period per search) only takes a reference under the lock.
  mutable std::mutex dht_mutex;
  std::map<std::string, std::shared_ptr<const Dictionary>> dht;

  std::mutex timer_mutex;
  std::condition_variable timer_wake;
  std::priority_queue<Timed, std::vector<Timed>, std::greater<Timed>> timers;
  uint64_t next_sequence = 0;
  bool timers_stopped = false;

  mutable std::mutex event_mutex;
  mutable std::condition_variable event_cv;
  uint64_t events = 0;

  // Declared last: the pool is shut down (and its threads joined) before the state above goes.
  WorkerPool pool;
  std::thread timer_thread;
};

namespace {

// One peer of the world, as its Matchmaker sees it.
class SimPeerEnv : public MatchmakingEnv {
 public:
  SimPeerEnv(std::shared_ptr<SimMatchmakingWorld::Core> core, std::shared_ptr<SimPeer> peer)
      : core_(std::move(core)), peer_(std::move(peer)) {}

  Future<dht::DhtRunnerStoreResult> StoreSubkey(const std::string& key, const std::string& subkey,
                                                std::string value,
                                                dht::DhtTime expiration) override {
    return core_->Store(*peer_, key, subkey, std::move(value), expiration);
  }
  Future<std::optional<dht::DhtRunnerValue>> GetLatest(const std::string& key) override {
    return core_->Get(*peer_, key);
  }
  dht::DhtTime Now() const override { return dht::DhtNow(); }
  std::string owner_marker() const override { return "[owner:" + peer_->id.ToString() + "]"; }

  const net::PeerId& peer_id() const override { return peer_->id; }
  std::vector<std::string> visible_addresses() const override { return peer_->addresses; }
  bool client_mode() const override { return peer_->client_mode; }
  bool is_running() const override { return core_->Running(*peer_); }

  void RegisterUnary(const std::string& method, net::UnaryHandler handler) override {
    if (!peer_->alive.load()) return;
    std::lock_guard<std::mutex> lock(peer_->mutex);
    peer_->handlers[method] = std::move(handler);
  }
  Future<net::Message> Call(const net::PeerAddress& peer, const std::string& method,
                            net::Message request, std::chrono::milliseconds timeout) override {
    return core_->Call(*peer_, peer.peer_id, method, std::move(request), timeout);
  }

 private:
  std::shared_ptr<SimMatchmakingWorld::Core> core_;
  std::shared_ptr<SimPeer> peer_;
};

}  // namespace

SimMatchmakingWorld::SimMatchmakingWorld(SimMatchmakingWorldOptions options)
    : core_(std::make_shared<Core>(options)) {}

SimMatchmakingWorld::~SimMatchmakingWorld() { Shutdown(); }

std::shared_ptr<MatchmakingEnv> SimMatchmakingWorld::AddPeer(bool client_mode) {
  auto peer = std::make_shared<SimPeer>();
  peer->client_mode = client_mode;
  {
    std::lock_guard<std::mutex> lock(core_->peers_mutex);
    net::PeerId::Bytes bytes;
    for (auto& byte : bytes) byte = static_cast<uint8_t>(core_->id_rng());
    peer->id = net::PeerId(bytes);
    const uint32_t index = ++core_->next_index;
    if (!client_mode) {
      // A made-up but well-formed address: the matchmaker parses the peer id back out of it.
      peer->addresses.push_back("/ip4/10." + std::to_string((index >> 16) & 255) + "." +
                                std::to_string((index >> 8) & 255) + "." +
                                std::to_string(index & 255) + "/tcp/31337/p2p/" +
                                peer->id.ToString());
    }
    core_->peers.emplace(peer->id, peer);
  }
  return std::make_shared<SimPeerEnv>(core_, std::move(peer));
}

void SimMatchmakingWorld::Kill(const net::PeerId& peer) {
  auto found = core_->Find(peer);
  if (!found) return;
  found->alive.store(false);
  std::map<std::string, net::UnaryHandler> dropped;
  {
    std::lock_guard<std::mutex> lock(found->mutex);
    dropped.swap(found->handlers);
  }
  core_->Notify();
}

bool SimMatchmakingWorld::IsAlive(const net::PeerId& peer) const {
  auto found = core_->Find(peer);
  return found && found->alive.load();
}

size_t SimMatchmakingWorld::LiveSubkeys(const std::string& key) const {
  const dht::DhtTime now = dht::DhtNow();
  auto snapshot = core_->Snapshot(key);
  if (!snapshot) return 0;
  size_t live = 0;
  for (const auto& [subkey, entry] : *snapshot) live += entry.expiration > now ? 1 : 0;
  return live;
}

uint64_t SimMatchmakingWorld::CallsServed(const net::PeerId& peer,
                                          const std::string& method) const {
  auto found = core_->Find(peer);
  if (!found) return 0;
  std::lock_guard<std::mutex> lock(found->mutex);
  auto it = found->served.find(method);
  return it == found->served.end() ? 0 : it->second;
}

uint64_t SimMatchmakingWorld::calls_delivered() const { return core_->delivered.load(); }

bool SimMatchmakingWorld::WaitUntil(const std::function<bool()>& condition,
                                    std::chrono::milliseconds timeout) const {
  const auto deadline = SteadyClock::now() + timeout;
  for (;;) {
    uint64_t seen;
    {
      std::lock_guard<std::mutex> lock(core_->event_mutex);
      seen = core_->events;
    }
    // Checked outside the lock (it may take the world's other locks); an event between the check
    // and the wait changes `events`, so it is never missed.
    if (condition()) return true;
    std::unique_lock<std::mutex> lock(core_->event_mutex);
    if (!core_->event_cv.wait_until(lock, deadline, [&] { return core_->events != seen; })) {
      lock.unlock();
      return condition();
    }
  }
}

void SimMatchmakingWorld::Shutdown() { core_->Shutdown(); }

}  // namespace hivemind::averaging
