#pragma once

// A ready-to-use DHT peer for applications: the Python DHT handle and the hivemind-dht CLI.
//
// This header is deliberately protobuf-free and light (no dht_node.h, no net_transport.h): it is
// included from csrc/torch/, where torch's bundled protobuf 3.13 headers would shadow Debian's
// (docs/building.md). Everything that touches protobuf lives in dht_runner.cpp, inside the core.

#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/future.h"
#include "common/status.h"
#include "dht/clock.h"
#include "net/node.h"

namespace hivemind::dht {

struct DhtRunnerOptions {
  // Multiaddrs ending in /p2p/<peer id>; one string per peer (several endpoints of one peer may be
  // separated by spaces or commas). Empty: this node starts a new swarm.
  std::vector<std::string> initial_peers;
  // What the node binds (port 0 picks a free port) and what it tells others instead (NAT).
  std::vector<std::string> listen_addresses = {"/ip4/0.0.0.0/tcp/0"};
  std::vector<std::string> announce_addresses;
  // Persistent identity (created with mode 0600 when missing); empty: a fresh ephemeral identity.
  std::string identity_path;
  // Accepts no inbound connections, never stores replicas for others (behind NAT, short-lived).
  bool client_mode = false;
  bool encryption = true;

  // Deadline of every DHT call (hivemind's wait_timeout).
  std::chrono::milliseconds call_timeout{3000};
  // How long Start() waits for the bootstrap (pings, then the lookup of our own id).
  std::chrono::milliseconds bootstrap_timeout{30000};
  // true: Start() fails when no initial peer answers. false: Start() succeeds, the failure is
  // logged and kept in Stats().bootstrap_error, and the maintenance thread retries with backoff.
  bool ensure_bootstrap_success = true;
  // While no initial peer has answered, bootstrap is retried after this delay, doubling up to
  // 300 s.
  double bootstrap_retry_seconds = 5;
  // How often the maintenance thread runs DhtNode::Maintain() (bootstrap retries, bucket
  // refresh, cache refresh, purging expired records).
  std::chrono::milliseconds maintenance_period{1000};
  // Upper bound on one blocking Store/Get through this runner: every DHT operation ends on its
  // own well before this (call deadlines x lookup depth); the bound is a safety net.
  std::chrono::milliseconds operation_timeout{120000};

  // Kademlia and storage knobs (hivemind's names and defaults in parentheses).
  size_t num_replicas = 5;                 // num_replicas (5)
  size_t bucket_size = 20;                 // bucket_size (20)
  int depth_modulo = 5;                    // depth_modulo (5)
  size_t parallelism = 4;                  // num_workers (4)
  bool cache_locally = true;               // cache_locally (True)
  size_t cache_nearest = 1;                // cache_nearest (1)
  double cache_refresh_before_expiry = 5;  // cache_refresh_before_expiry (5 s)
  double blacklist_time = 5;               // blacklist_time (5 s)
  double backoff_rate = 2;                 // backoff_rate (2)
  double bucket_refresh_seconds = 600;     // refresh_timeout (hivemind: off by default)
};

// One value with its absolute expiration (seconds since the Unix epoch).
struct DhtRunnerEntry {
  std::string value;
  DhtTime expiration = 0;
};

// What a key holds, as a reader sees it: a dictionary when any subkey is live, else the regular
// value. Signatures of owner-signed records are already checked and stripped.
struct DhtRunnerValue {
  std::optional<DhtRunnerEntry> regular;             // set when the key holds a plain value
  std::map<std::string, DhtRunnerEntry> dictionary;  // non-empty for a dictionary value
  bool is_dictionary() const { return !dictionary.empty(); }
};

struct DhtRunnerStoreResult {
  // OK: at least one replica accepted the record. Otherwise why not: FAILED_PRECONDITION (a newer
  // value is stored), UNAVAILABLE (no node reachable), PERMISSION_DENIED (signature) ...
  Status status;
  size_t replicas = 0;
};

struct DhtRunnerStats {
  size_t routing_table_size = 0;
  size_t stored_keys = 0;  // replicas this node keeps for the swarm
  size_t cached_keys = 0;
  size_t blacklisted = 0;
  bool bootstrapped = false;
  // The last bootstrap failure while no peer is known (empty once bootstrapped or when started
  // without initial peers).
  std::string bootstrap_error;
};

// Owns a net::Node, the DHT node and its transport, and a maintenance thread. Thread-safe: any
// number of threads may Store/Get at once. Shutdown() (or the destructor) stops everything in the
// order the DHT needs (maintenance thread, then the net::Node, then the DHT node).
class DhtRunner {
 public:
  // Starts the node and bootstraps from options.initial_peers. Fails with INVALID_ARGUMENT for a
  // bad address or option, with the identity file's error, with UNAVAILABLE when no initial peer
  // answers and ensure_bootstrap_success is set.
  static Result<std::unique_ptr<DhtRunner>> Start(DhtRunnerOptions options);
  ~DhtRunner();

  DhtRunner(const DhtRunner&) = delete;
  DhtRunner& operator=(const DhtRunner&) = delete;

  // Asynchronous operations. A record refused before any network traffic (expired, too far
  // ahead, too large) fails the future itself with INVALID_ARGUMENT / RESOURCE_EXHAUSTED; a record
  // refused by the swarm completes with a non-OK DhtRunnerStoreResult::status. After Shutdown()
  // both fail with FAILED_PRECONDITION.
  Future<DhtRunnerStoreResult> StoreAsync(std::string key, std::string value, DhtTime expiration,
                                          std::optional<std::string> subkey = std::nullopt);
  // nullopt: nobody holds a live value. latest=true: ask every nearest node and merge.
  Future<std::optional<DhtRunnerValue>> GetAsync(std::string key, bool latest = false);

  // Blocking forms, bounded by options.operation_timeout (DEADLINE_EXCEEDED past it).
  Result<DhtRunnerStoreResult> Store(std::string key, std::string value, DhtTime expiration,
                                     std::optional<std::string> subkey = std::nullopt);
  Result<std::optional<DhtRunnerValue>> Get(std::string key, bool latest = false);

  // Base58 peer id.
  std::string peer_id() const;
  // The multiaddrs others pass as initial peers, each ending in /p2p/<peer id>; empty in client
  // mode.
  std::vector<std::string> visible_addresses() const;
  // "[owner:<peer id>]": put it in a key or subkey to make records only this node can write.
  std::string owner_marker() const;
  DhtRunnerStats Stats() const;
  // The node the DHT runs on, for other services of the same peer (averaging, state transfer) to
  // register their methods on and call through: one identity and one connection per peer pair.
  net::Node& node();
  bool client_mode() const;
  bool is_running() const;

  // Idempotent. Pending operations fail with CANCELLED; blocks until the threads are joined.
  void Shutdown();

  struct Impl;

 private:
  explicit DhtRunner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The wall clock the DHT uses for expirations (seconds since the Unix epoch, like time.time()).
DhtTime DhtNow();

}  // namespace hivemind::dht
