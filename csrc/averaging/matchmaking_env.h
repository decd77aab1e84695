// What the matchmaker needs from the peer it runs on, and nothing more: a DHT to declare in and
// read declarations from, and a node to serve and call the three matchmaking methods.
//
// Two implementations: DhtRunnerMatchmakingEnv (matchmaking_env_dht.h) forwards to a real
// dht::DhtRunner and its net::Node; SimMatchmakingWorld (matchmaking_sim_world.h) runs hundreds of
// peers in one process on an ideal in-memory DHT, so that the protocol can be tested at the scale
// of a swarm without a socket per peer.
//
// Protobuf-free, like matchmaking.h: the torch extension may include it.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "common/future.h"
#include "dht/clock.h"
#include "dht/dht_runner.h"
#include "net/address.h"
#include "net/message.h"
#include "net/node.h"
#include "net/peer_id.h"

namespace hivemind::averaging {

// Thread-safe: the matchmaker calls it from FormGroup threads and from its handlers at once.
class MatchmakingEnv {
 public:
  virtual ~MatchmakingEnv() = default;

  // ---- the DHT, as dht::DhtRunner offers it ----
  // Stores `value` under `key` / `subkey` until `expiration`; a later expiration replaces an
  // earlier one. Same results as DhtRunner::StoreAsync with a subkey.
  virtual Future<dht::DhtRunnerStoreResult> StoreSubkey(const std::string& key,
                                                        const std::string& subkey,
                                                        std::string value,
                                                        dht::DhtTime expiration) = 0;
  // The live subkeys of `key`, newest version of each (DhtRunner::GetAsync(key, latest=true));
  // nullopt when nothing under `key` is live.
  virtual Future<std::optional<dht::DhtRunnerValue>> GetLatest(const std::string& key) = 0;
  // DHT time (seconds since the Unix epoch); declarations are ordered by it.
  virtual dht::DhtTime Now() const = 0;
  // "[owner:<peer id>]": a subkey containing it is writable by this peer only, and readers learn
  // the declaring peer's id from it.
  virtual std::string owner_marker() const = 0;

  // ---- this peer ----
  virtual const net::PeerId& peer_id() const = 0;
  // Multiaddrs ending in /p2p/<peer id>; empty in client mode.
  virtual std::vector<std::string> visible_addresses() const = 0;
  // Accepts no inbound connections: never leads, never asked to.
  virtual bool client_mode() const = 0;
  // false once the peer's DHT (and so its node) is shut down or the peer was killed.
  virtual bool is_running() const = 0;

  // ---- the node ----
  // Registering a method twice replaces the handler (net::Node's rule).
  virtual void RegisterUnary(const std::string& method, net::UnaryHandler handler) = 0;
  // The reply of `peer` to `request`, or an error: UNAVAILABLE (unreachable or dead),
  // DEADLINE_EXCEEDED (no reply within `timeout`), CANCELLED (Future::Cancel, shutdown).
  virtual Future<net::Message> Call(const net::PeerAddress& peer, const std::string& method,
                                    net::Message request, std::chrono::milliseconds timeout) = 0;
};

}  // namespace hivemind::averaging
