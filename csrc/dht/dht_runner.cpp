#include "dht/dht_runner.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <utility>

#include "common/logging.h"
#include "dht/dht_node.h"
#include "dht/net_transport.h"
#include "dht/record_storage.h"
#include "dht/signed_record_validator.h"
#include "net/identity.h"
#include "net/node.h"

namespace hivemind::dht {

namespace {

Status InvalidOption(const std::string& what) {
  return Status(StatusCode::kInvalidArgument, "bad DHT option: " + what);
}

Status CheckOptions(const DhtRunnerOptions& o) {
  using std::chrono::milliseconds;
  if (o.call_timeout <= milliseconds(0)) return InvalidOption("call timeout must be positive");
  if (o.bootstrap_timeout <= milliseconds(0)) {
    return InvalidOption("bootstrap timeout must be positive");
  }
  if (o.maintenance_period <= milliseconds(0)) {
    return InvalidOption("maintenance period must be positive");
  }
  if (o.operation_timeout <= milliseconds(0)) {
    return InvalidOption("operation timeout must be positive");
  }
  if (o.num_replicas == 0) return InvalidOption("num_replicas must be at least 1");
  if (o.bucket_size == 0) return InvalidOption("bucket_size must be at least 1");
  if (o.depth_modulo < 1) return InvalidOption("depth_modulo must be at least 1");
  if (o.parallelism == 0) return InvalidOption("parallelism (num_workers) must be at least 1");
  if (!(o.blacklist_time >= 0)) return InvalidOption("blacklist_time must be >= 0");
  if (!(o.backoff_rate >= 1)) return InvalidOption("backoff_rate must be >= 1");
  if (!(o.cache_refresh_before_expiry >= 0)) {
    return InvalidOption("cache_refresh_before_expiry must be >= 0");
  }
  if (!(o.bootstrap_retry_seconds > 0)) return InvalidOption("bootstrap retry delay must be > 0");
  if (!(o.bucket_refresh_seconds > 0)) return InvalidOption("bucket refresh period must be > 0");
  if (o.client_mode && !o.announce_addresses.empty()) {
    return InvalidOption("a client-mode node accepts no connections: it has nothing to announce");
  }
  if (!o.client_mode && o.listen_addresses.empty()) {
    return InvalidOption("a DHT server needs at least one listen address");
  }
  return Status::Ok();
}

DhtOptions ToDhtOptions(const DhtRunnerOptions& o, const net::Identity& identity) {
  DhtOptions options;
  options.routing.bucket_size = o.bucket_size;
  options.routing.depth_modulo = o.depth_modulo;
  options.traversal.parallelism = o.parallelism;
  // hivemind's beam size is its bucket size.
  options.traversal.beam_size = o.bucket_size;
  options.num_replicas = o.num_replicas;
  options.cache_locally = o.cache_locally;
  options.cache_nearest = o.cache_nearest;
  options.cache_refresh_before_expiry_seconds = o.cache_refresh_before_expiry;
  options.blacklist_base_seconds = o.blacklist_time;
  options.blacklist_backoff = o.backoff_rate;
  options.bucket_refresh_seconds = o.bucket_refresh_seconds;
  options.bootstrap_retry_seconds = o.bootstrap_retry_seconds;
  options.client_mode = o.client_mode;
  // Owner-signed records work out of the box: records naming this node as owner are signed with
  // its identity, records naming anyone else are verified.
  options.validator = std::make_shared<SignedRecordValidator>(identity);
  return options;
}

DhtRunnerValue ToRunnerValue(const DhtValue& value) {
  DhtRunnerValue out;
  if (value.is_dictionary()) {
    for (const auto& [subkey, entry] : value.dictionary()) {
      out.dictionary.emplace(subkey, DhtRunnerEntry{entry.value, entry.expiration});
    }
  } else if (value.regular()) {
    out.regular = DhtRunnerEntry{value.regular()->value, value.regular()->expiration};
  }
  return out;
}

template <class T>
Result<T> WaitBounded(const Future<T>& future, std::chrono::milliseconds bound,
                      const char* operation) {
  auto result = future.WaitFor(bound);
  if (result) return *result;
  future.Cancel();
  return Status(StatusCode::kDeadlineExceeded, std::string("DHT ") + operation +
                                                   " did not finish within " +
                                                   std::to_string(bound.count()) + " ms");
}

}  // namespace

DhtTime DhtNow() { return SystemClock().Now(); }

struct DhtRunner::Impl {
  DhtRunnerOptions options;
  std::shared_ptr<const Clock> clock = std::make_shared<SystemClock>();
  std::unique_ptr<net::Node> node;
  std::shared_ptr<NetDhtTransport> transport;
  std::string peer_id;
  std::vector<std::string> visible_addresses;
  std::string owner_marker;

  // Guards `dht` and `bootstrap_error`. Operations copy the shared_ptr under the lock and then work
  // without it, so Shutdown() can drop the node while other threads finish their calls (they fail
  // with CANCELLED once the net::Node is shut down).
  mutable std::mutex mutex;
  std::shared_ptr<DhtNode> dht;
  std::string bootstrap_error;

  // The maintenance thread sleeps on `wake` so that Shutdown() does not wait for a full period.
  std::mutex maintenance_mutex;
  std::condition_variable wake;
  bool stopping = false;
  std::thread maintenance;

  std::mutex shutdown_mutex;

  std::shared_ptr<DhtNode> Dht() const {
    std::lock_guard<std::mutex> lock(mutex);
    return dht;
  }

  void MaintenanceLoop() {
    std::unique_lock<std::mutex> lock(maintenance_mutex);
    while (!stopping) {
      wake.wait_for(lock, options.maintenance_period, [&] { return stopping; });
      if (stopping) break;
      lock.unlock();
      if (auto node = Dht()) {
        // Maintain() only starts asynchronous work (retries, refresh lookups); it never blocks
        // on the network, so Shutdown() is never held up by it for long.
        node->Maintain();
        if (node->Stats().bootstrapped) {
          std::lock_guard<std::mutex> guard(mutex);
          bootstrap_error.clear();
        }
      }
      lock.lock();
    }
  }

  void Shutdown() {
    std::lock_guard<std::mutex> guard(shutdown_mutex);
    {
      std::lock_guard<std::mutex> lock(maintenance_mutex);
      stopping = true;
    }
    wake.notify_all();
    if (maintenance.joinable()) maintenance.join();
    // Order matters (docs/dht.md): the net::Node fails every pending call and joins its threads
    // first, so no callback can reach the DHT node or the transport once they are dropped.
    if (node) node->Shutdown();
    std::shared_ptr<DhtNode> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex);
      dropped.swap(dht);
    }
    dropped.reset();
    // The transport holds a raw pointer to the node: keep both alive as long as the runner, since
    // an operation that copied `dht` before the swap may still call through them (it gets
    // CANCELLED from the shut-down node).
  }
};

Result<std::unique_ptr<DhtRunner>> DhtRunner::Start(DhtRunnerOptions options) {
  Status valid = CheckOptions(options);
  if (!valid.ok()) return valid;

  // Parse every initial peer before opening any socket, so a typo fails fast and names itself.
  std::vector<Contact> initial_peers;
  for (const auto& address : options.initial_peers) {
    auto contact = NetDhtTransport::ContactFromAddress(address);
    if (!contact.ok()) {
      return Status(StatusCode::kInvalidArgument,
                    "bad initial peer '" + address + "': " + contact.status().message());
    }
    initial_peers.push_back(std::move(contact).value());
  }

  net::NodeOptions node_options;
  if (!options.identity_path.empty()) {
    auto identity = net::Identity::LoadOrCreate(options.identity_path);
    if (!identity.ok()) {
      return identity.status().WithContext("DHT identity file '" + options.identity_path + "'");
    }
    node_options.identity = std::move(identity).value();
  } else {
    node_options.identity = net::Identity::Generate();
  }
  node_options.listen_addresses = options.listen_addresses;
  node_options.announce_addresses = options.announce_addresses;
  node_options.client_mode = options.client_mode;
  node_options.encryption = options.encryption;
  // A dead initial peer should not hold a call past its DHT deadline.
  node_options.connect_timeout = std::min(node_options.connect_timeout, options.call_timeout);

  auto impl = std::make_unique<Impl>();
  impl->options = options;
  auto node = net::Node::Start(node_options);
  if (!node.ok()) return node.status().WithContext("cannot start the DHT's network node");
  impl->node = std::move(node).value();
  impl->peer_id = impl->node->peer_id().ToString();
  impl->visible_addresses = impl->node->visible_address().ToStrings();
  impl->owner_marker = SignedRecordValidator::OwnerMarker(impl->node->peer_id());

  NetTransportOptions transport_options;
  transport_options.call_timeout = options.call_timeout;
  impl->transport = std::make_shared<NetDhtTransport>(impl->node.get(), transport_options);
  impl->dht = DhtNode::Create(NetDhtTransport::SelfContact(*impl->node), impl->transport,
                              impl->clock, ToDhtOptions(options, impl->node->identity()));
  if (!options.client_mode) impl->transport->Serve(impl->dht);

  if (!initial_peers.empty()) {
    auto bootstrapped = WaitBounded(impl->dht->Bootstrap(std::move(initial_peers)),
                                    options.bootstrap_timeout, "bootstrap");
    if (!bootstrapped.ok()) {
      if (options.ensure_bootstrap_success) {
        impl->Shutdown();
        return bootstrapped.status();
      }
      // DhtNode::Maintain() retries with backoff while the routing table is empty.
      HM_LOG(kWarning) << "DHT node " << impl->peer_id
                       << " keeps running without peers: " << bootstrapped.status().ToString();
      impl->bootstrap_error = bootstrapped.status().ToString();
    }
  }

  Impl* raw = impl.get();
  impl->maintenance = std::thread([raw] { raw->MaintenanceLoop(); });
  return std::unique_ptr<DhtRunner>(new DhtRunner(std::move(impl)));
}

DhtRunner::DhtRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DhtRunner::~DhtRunner() { Shutdown(); }

void DhtRunner::Shutdown() { impl_->Shutdown(); }

bool DhtRunner::is_running() const { return impl_->Dht() != nullptr; }

net::Node& DhtRunner::node() { return *impl_->node; }

bool DhtRunner::client_mode() const { return impl_->options.client_mode; }

std::string DhtRunner::peer_id() const { return impl_->peer_id; }

std::vector<std::string> DhtRunner::visible_addresses() const { return impl_->visible_addresses; }

std::string DhtRunner::owner_marker() const { return impl_->owner_marker; }

DhtRunnerStats DhtRunner::Stats() const {
  DhtRunnerStats stats;
  auto dht = impl_->Dht();
  if (dht) {
    DhtNodeStats node = dht->Stats();
    stats.routing_table_size = node.routing_table_size;
    stats.stored_keys = node.stored_keys;
    stats.cached_keys = node.cached_keys;
    stats.blacklisted = node.blacklisted;
    stats.bootstrapped = node.bootstrapped;
  }
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (!stats.bootstrapped) stats.bootstrap_error = impl_->bootstrap_error;
  return stats;
}

Future<DhtRunnerStoreResult> DhtRunner::StoreAsync(std::string key, std::string value,
                                                   DhtTime expiration,
                                                   std::optional<std::string> subkey) {
  auto dht = impl_->Dht();
  if (!dht) {
    return Future<DhtRunnerStoreResult>::Ready(
        Status(StatusCode::kFailedPrecondition, "the DHT node is shut down"));
  }
  // The user's own mistakes are reported as errors, not as a refused store: checked here against
  // the same caps every storing node applies.
  TimedValue timed{value, expiration};
  Status limits = CheckRecordLimits(dht->options().limits, subkey, timed, impl_->clock->Now());
  if (!limits.ok()) return Future<DhtRunnerStoreResult>::Ready(limits);

  Promise<DhtRunnerStoreResult> promise;
  dht->Store(std::move(key), std::move(value), expiration, std::move(subkey))
      .OnReady([promise](const Result<StoreOutcome>& outcome) {
        if (!outcome.ok()) {
          promise.Set(outcome.status());
          return;
        }
        promise.Set(DhtRunnerStoreResult{outcome->status, outcome->replicas});
      });
  return promise.future();
}

Future<std::optional<DhtRunnerValue>> DhtRunner::GetAsync(std::string key, bool latest) {
  auto dht = impl_->Dht();
  if (!dht) {
    return Future<std::optional<DhtRunnerValue>>::Ready(
        Status(StatusCode::kFailedPrecondition, "the DHT node is shut down"));
  }
  Promise<std::optional<DhtRunnerValue>> promise;
  dht->Get(std::move(key), latest).OnReady([promise](const Result<GetOutcome>& outcome) {
    if (!outcome.ok()) {
      promise.Set(outcome.status());
      return;
    }
    if (!outcome->value || outcome->value->empty()) {
      promise.Set(std::optional<DhtRunnerValue>());
      return;
    }
    promise.Set(std::optional<DhtRunnerValue>(ToRunnerValue(*outcome->value)));
  });
  return promise.future();
}

Result<DhtRunnerStoreResult> DhtRunner::Store(std::string key, std::string value,
                                              DhtTime expiration,
                                              std::optional<std::string> subkey) {
  return WaitBounded(StoreAsync(std::move(key), std::move(value), expiration, std::move(subkey)),
                     impl_->options.operation_timeout, "store");
}

Result<std::optional<DhtRunnerValue>> DhtRunner::Get(std::string key, bool latest) {
  return WaitBounded(GetAsync(std::move(key), latest), impl_->options.operation_timeout, "get");
}

}  // namespace hivemind::dht
