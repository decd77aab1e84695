// An in-memory swarm for matchmaking: hundreds of peers in one process, without a socket each, so
// that the protocol of matchmaking.h can be tested at the scale of a real swarm (a process holds
// fewer than 200 real peers before it runs out of file descriptors).
//
// One world holds an ideal DHT (a dictionary key -> subkey -> value with expirations; a store is
// visible to every reader at once) and the peers by id with their registered handlers. A call is
// delivered on a small thread pool after an optional latency, and its reply comes back after
// another, so replies arrive asynchronously as over a network; a call still unanswered at its
// timeout fails with DEADLINE_EXCEEDED. A killed peer behaves like a crashed process: its handlers
// are dropped, calls to it fail with UNAVAILABLE, replies it had not sent yet are lost, and its own
// DHT and calls fail.
//
// Real time, no virtual clock: DHT time is the wall clock and timeouts are real, so tests stay fast
// only as long as their windows and timeouts are short. The thread count is bounded (the pool plus
// one timer thread) whatever the number of peers and calls.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "averaging/matchmaking_env.h"
#include "net/peer_id.h"

namespace hivemind::averaging {

struct SimMatchmakingWorldOptions {
  // Threads running handlers and delivering replies.
  int threads = 2;
  // One-way latency of every call, uniform in [min_latency, max_latency]; zero: delivered as soon
  // as a pool thread is free.
  std::chrono::microseconds min_latency{0};
  std::chrono::microseconds max_latency{0};
  // Seeds peer ids and latencies (thread scheduling still varies from run to run).
  uint64_t seed = 1;
};

class SimMatchmakingWorld {
 public:
  explicit SimMatchmakingWorld(SimMatchmakingWorldOptions options = {});
  // Shutdown(). Envs may outlive the world: everything they do then fails with CANCELLED.
  ~SimMatchmakingWorld();
  SimMatchmakingWorld(const SimMatchmakingWorld&) = delete;
  SimMatchmakingWorld& operator=(const SimMatchmakingWorld&) = delete;

  // A new live peer with a fresh id and a made-up address (none in client mode), for a Matchmaker.
  std::shared_ptr<MatchmakingEnv> AddPeer(bool client_mode = false);
  // Crashes `peer` (see the top of this file). Idempotent.
  void Kill(const net::PeerId& peer);
  bool IsAlive(const net::PeerId& peer) const;

  // What tests wait on and measure.
  size_t LiveSubkeys(const std::string& key) const;
  // Calls of `method` that reached `peer`'s handler.
  uint64_t CallsServed(const net::PeerId& peer, const std::string& method) const;
  uint64_t calls_delivered() const;
  // Blocks until `condition` holds (re-checked after every DHT store, delivered call and kill) or
  // `timeout` passes; returns the last value of `condition`. `condition` may call the getters
  // above.
  bool WaitUntil(const std::function<bool()>& condition, std::chrono::milliseconds timeout) const;

  // Fails pending calls with CANCELLED and joins the threads. Idempotent.
  void Shutdown();

  struct Core;

 private:
  std::shared_ptr<Core> core_;
};

}  // namespace hivemind::averaging
