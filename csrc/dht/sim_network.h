#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <queue>
#include <random>
#include <unordered_map>
#include <vector>

#include "dht/clock.h"
#include "dht/transport.h"
#include "net/peer_id.h"

namespace hivemind::dht {

// A deterministic in-process network for simulating many DHT nodes: a virtual clock and an event
// queue. A call is delivered to the callee's DhtService after a random latency, and its answer
// comes back after another; a call to a peer that is down fails with DEADLINE_EXCEEDED after
// rpc_timeout_seconds of virtual time, as it would over a real network. Nothing happens until the
// test runs the queue, so a test of 500 nodes takes milliseconds and replays exactly from its seed.
// Single-threaded: create, run and inspect everything from one thread.
class SimNetwork : public Clock {
 public:
  struct Options {
    double min_latency_seconds = 0.005;
    double max_latency_seconds = 0.050;
    double rpc_timeout_seconds = 3.0;
    uint64_t seed = 1;
    DhtTime start_time = 1'700'000'000.0;
  };

  explicit SimNetwork(Options options);

  DhtTime Now() const override { return now_; }

  // A transport that sends as `self`.
  std::shared_ptr<DhtTransport> CreateTransport(const net::PeerId& self);
  // Makes `service` reachable as `peer` (held weakly: a destroyed node is simply down).
  void Attach(const net::PeerId& peer, std::weak_ptr<DhtService> service);
  // Takes `peer` down: calls to it time out from now on, and answers it was about to send are lost.
  void Kill(const net::PeerId& peer);
  bool IsUp(const net::PeerId& peer) const;

  void Schedule(double delay_seconds, std::function<void()> action);
  // Runs events in time order until `done()` holds, the queue empties, or virtual time passes
  // `max_seconds` from now. Returns done().
  bool RunUntil(const std::function<bool()>& done, double max_seconds = 3600);
  // Runs every event due within the next `seconds`, then sets the clock to that time.
  void RunFor(double seconds);

  uint64_t delivered_calls() const { return delivered_calls_; }

 private:
  class Transport;
  struct Event {
    DhtTime time;
    uint64_t sequence;
    std::function<void()> action;
    bool operator>(const Event& other) const {
      return time != other.time ? time > other.time : sequence > other.sequence;
    }
  };

  double Latency();
  // Delivers one call: runs `serve` on the callee after a latency and hands its answer to `reply`.
  template <class Response>
  void Deliver(const net::PeerId& from, const net::PeerId& to,
               std::function<Result<Response>(DhtService&)> serve,
               DhtTransport::Callback<Response> reply);

  Options options_;
  DhtTime now_;
  uint64_t next_sequence_ = 0;
  uint64_t delivered_calls_ = 0;
  std::mt19937_64 rng_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  std::unordered_map<net::PeerId, std::weak_ptr<DhtService>> services_;
};

}  // namespace hivemind::dht
