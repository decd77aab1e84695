#pragma once

#include <cstddef>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/future.h"
#include "common/status.h"
#include "dht/blacklist.h"
#include "dht/clock.h"
#include "dht/contact.h"
#include "dht/dht_id.h"
#include "dht/dht_value.h"
#include "dht/messages.h"
#include "dht/record_storage.h"
#include "dht/record_validator.h"
#include "dht/routing_table.h"
#include "dht/transport.h"
#include "dht/traversal.h"

namespace hivemind::dht {

// Every knob of a DHT node, with hivemind's defaults where it has one.
struct DhtOptions {
  // bucket_size (k = 20), depth_modulo (5), replacement cache, eviction after failed calls.
  RoutingTableOptions routing;
  // parallelism (α = 4), beam_size (20), keys per find request (16).
  TraversalOptions traversal;
  // Each record is stored on this many nodes nearest to its key (ourselves included, unless
  // client).
  size_t num_replicas = 5;
  // Caps on what this node stores for others and accepts from its user.
  StorageLimits limits;
  // Values found by get() are cached here and pushed (as cache, not replica) to this many of the
  // nearest nodes that lacked them, so that popular keys get cheaper to find.
  bool cache_locally = true;
  size_t cache_nearest = 1;
  size_t cache_max_keys = 4096;
  // Cached keys that were read get fetched again this long before they expire.
  double cache_refresh_before_expiry_seconds = 5;
  // A bucket with no news for this long gets a lookup of a random id inside it.
  double bucket_refresh_seconds = 600;
  // Unresponsive peers: banned for base, base×backoff, ... seconds (capped).
  double blacklist_base_seconds = 5;
  double blacklist_backoff = 2;
  double blacklist_max_seconds = 600;
  // While no initial peer has answered, bootstrap is retried after this delay, doubling up to the
  // max.
  double bootstrap_retry_seconds = 5;
  double bootstrap_retry_max_seconds = 300;
  // A client-mode node accepts no inbound calls: it gets and stores but never enters routing tables
  // and never stores replicas.
  bool client_mode = false;
  // Caps on one incoming request.
  size_t max_keys_per_find = 1024;
  size_t max_items_per_store = 1024;
  size_t max_addresses_per_contact = 8;
  // Handing stored records to newly met nodes scans the storage; above this many keys it is
  // skipped.
  size_t max_keys_for_handoff = 16384;
  std::shared_ptr<const RecordValidator> validator;
  // Seeds the node's random choices (refresh targets); 0 derives a seed from the peer id.
  uint64_t random_seed = 0;
};

// One write requested by the user.
struct StoreRecord {
  std::string key;
  std::optional<std::string> subkey;  // set: one entry of a dictionary value
  std::string value;
  DhtTime expiration = 0;
};

struct StoreOutcome {
  // OK when at least one replica accepted the record; otherwise the reason the last one gave.
  Status status;
  size_t replicas = 0;  // how many nodes (ourselves included) accepted it
};

struct GetOutcome {
  std::optional<DhtValue> value;  // live, validated, stripped; nullopt when nobody has it
  int hops = 0;                   // sequential RPC depth that found it (0: local)
  int requests = 0;               // find requests this lookup sent
};

// Node counters for tests and logs.
struct DhtNodeStats {
  size_t routing_table_size = 0;
  size_t stored_keys = 0;
  size_t cached_keys = 0;
  size_t blacklisted = 0;
  bool bootstrapped = false;
};

// A Kademlia DHT node with hivemind's record semantics. It serves the ping/store/find RPCs
// (DhtService) and runs the user's operations over a DhtTransport, reading the time from a Clock;
// both are injected, so that one process can simulate hundreds of nodes (sim_network.h) and the
// real node runs over ZeroMQ (net_transport.h). Thread-safe. Operations return futures that
// complete within the transport's call timeout times the lookup depth; nothing in here waits.
//
// Keep a shared_ptr: pending calls hold the node alive until they complete.
class DhtNode : public DhtService, public std::enable_shared_from_this<DhtNode> {
 public:
  static std::shared_ptr<DhtNode> Create(Contact self, std::shared_ptr<DhtTransport> transport,
                                         std::shared_ptr<const Clock> clock, DhtOptions options);

  // Pings every initial peer, then looks up our own id to fill the routing table. Fails with
  // UNAVAILABLE naming each peer's error when none answers; Maintain() then keeps retrying with
  // backoff while the routing table is empty.
  Future<Empty> Bootstrap(std::vector<Contact> initial_peers);

  // Stores records on the num_replicas nodes nearest to each key; one outcome per record.
  Future<std::vector<StoreOutcome>> StoreMany(std::vector<StoreRecord> records);
  Future<StoreOutcome> Store(std::string key, std::string value, DhtTime expiration,
                             std::optional<std::string> subkey = std::nullopt);

  // Looks keys up. latest=false stops at the first live value; latest=true searches until the
  // nearest nodes have all answered and merges everything found, to return the freshest value.
  Future<std::vector<GetOutcome>> GetMany(std::vector<std::string> keys, bool latest = false);
  Future<GetOutcome> Get(std::string key, bool latest = false);

  // The `count` (at most beam_size) live nodes nearest to each id, ourselves not included.
  Future<std::vector<std::vector<Contact>>> FindNearest(std::vector<DhtId> ids);

  // Periodic upkeep: drops expired records and blacklist entries, retries a failed bootstrap,
  // refreshes stale buckets and cached keys about to expire. Call every few seconds.
  void Maintain();

  // DhtService
  Result<PingResponse> HandlePing(const net::PeerId& from, const PingRequest& request) override;
  Result<StoreResponse> HandleStore(const net::PeerId& from, const StoreRequest& request) override;
  Result<FindResponse> HandleFind(const net::PeerId& from, const FindRequest& request) override;

  const Contact& self() const { return self_; }
  const DhtOptions& options() const { return options_; }
  DhtNodeStats Stats() const;
  // Routing-table contacts (tests and diagnostics).
  std::vector<Contact> KnownContacts() const;

 private:
  // Work decided under the lock and carried out after releasing it.
  struct Deferred {
    std::vector<Contact> pings;
    std::vector<std::pair<Contact, StoreRequest>> handoffs;
  };
  struct GetRequest;

  DhtNode(Contact self, std::shared_ptr<DhtTransport> transport, std::shared_ptr<const Clock> clock,
          DhtOptions options);

  SenderInfo MySender() const;
  std::vector<Contact> InitialCandidates(const DhtId& target) const;
  bool IsCallable(const Contact& contact) const;

  // Routing-table and blacklist bookkeeping after every call we made.
  void NoteCallResult(const Contact& contact, const Status& status, bool is_server);
  void NoteContactLocked(const Contact& contact, DhtTime now, Deferred& deferred);
  void AddSenderLocked(const net::PeerId& from, const SenderInfo& sender, DhtTime now,
                       Deferred& deferred);
  void RunDeferred(Deferred deferred);
  void PingCandidate(const Contact& contact);

  void SendFind(const Contact& to, std::vector<DhtId> keys, Traversal::FindResultsCallback done);
  void SendStore(const Contact& to, StoreRequest request,
                 DhtTransport::Callback<StoreResponse> done);
  void RunTraversal(std::vector<DhtId> targets, Traversal::ResultFn on_result,
                    Traversal::DoneFn done);

  Future<Empty> RunBootstrap(std::vector<Contact> peers);
  Future<std::vector<GetOutcome>> GetById(std::vector<DhtId> ids,
                                          std::vector<std::optional<std::string>> raw_keys,
                                          std::vector<DhtTime> sufficient_expiration,
                                          bool use_local);
  void FinishGet(const std::shared_ptr<GetRequest>& request,
                 const std::vector<TraversalOutcome>& outcomes, const TraversalStats& stats);

  // Validates every entry of a value received from elsewhere; drops the ones that fail.
  void ValidateValue(const DhtId& key, const std::optional<std::string>& raw_key,
                     DhtValue& value) const;
  DhtValue StripValue(const DhtId& key, const std::optional<std::string>& raw_key,
                      const DhtValue& value) const;
  // The store items that carry a whole value (regular part and every subkey).
  static std::vector<StoreItem> ItemsOf(const DhtId& key, const std::optional<std::string>& raw_key,
                                        const DhtValue& value, bool in_cache);
  Status CheckItemShape(const StoreItem& item) const;

  const Contact self_;
  const std::shared_ptr<DhtTransport> transport_;
  const std::shared_ptr<const Clock> clock_;
  const DhtOptions options_;

  mutable std::mutex mutex_;
  RoutingTable table_;
  Blacklist blacklist_;
  RecordStorage storage_;
  RecordStorage cache_;
  // Cached keys a get() was answered from: candidates for refresh before expiry.
  std::unordered_map<DhtId, std::optional<std::string>> cache_used_;
  std::mt19937_64 rng_;
  std::vector<Contact> bootstrap_peers_;
  bool bootstrapped_ = false;
  bool bootstrap_running_ = false;
  DhtTime next_bootstrap_retry_ = 0;
  double bootstrap_retry_delay_;
};

}  // namespace hivemind::dht
