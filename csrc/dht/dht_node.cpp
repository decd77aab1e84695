#include "dht/dht_node.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/logging.h"

namespace hivemind::dht {

namespace {

constexpr DhtTime kInfinity = std::numeric_limits<DhtTime>::infinity();

// What a call's status says about the peer. Transport failures and garbled answers count against
// it; an error status the peer sent back proves it is alive; a call we cancelled (shutdown) says
// nothing.
enum class PeerVerdict { kAlive, kFailed, kUnknown };

PeerVerdict JudgePeer(const Status& status) {
  switch (status.code()) {
    case StatusCode::kUnavailable:
    case StatusCode::kDeadlineExceeded:
    case StatusCode::kProtocolError:
      return PeerVerdict::kFailed;
    case StatusCode::kCancelled:
      return PeerVerdict::kUnknown;
    default:
      return PeerVerdict::kAlive;
  }
}

uint64_t SeedFrom(const net::PeerId& peer) {
  uint64_t seed;
  std::memcpy(&seed, peer.bytes().data(), sizeof(seed));
  return seed;
}

}  // namespace

// The state of one GetById call, shared by the traversal's callbacks (which the traversal
// serialises) and the final step.
struct DhtNode::GetRequest {
  std::vector<DhtId> ids;
  std::vector<std::optional<std::string>> raw_keys;
  std::vector<DhtTime> sufficient;
  std::vector<std::optional<DhtValue>> values;
  std::vector<bool> from_local;  // satisfied without asking anyone
  // Per key: nodes that answered without a value, as (distance, contact), to push a cached copy to.
  std::vector<std::vector<std::pair<DhtId, Contact>>> lacking;
  std::vector<size_t> pending;  // indices of keys searched on the network
  Promise<std::vector<GetOutcome>> promise;
  DhtTime started = 0;
};

std::shared_ptr<DhtNode> DhtNode::Create(Contact self, std::shared_ptr<DhtTransport> transport,
                                         std::shared_ptr<const Clock> clock, DhtOptions options) {
  return std::shared_ptr<DhtNode>(
      new DhtNode(std::move(self), std::move(transport), std::move(clock), std::move(options)));
}

DhtNode::DhtNode(Contact self, std::shared_ptr<DhtTransport> transport,
                 std::shared_ptr<const Clock> clock, DhtOptions options)
    : self_(std::move(self)),
      transport_(std::move(transport)),
      clock_(std::move(clock)),
      options_(std::move(options)),
      table_(self_.id, options_.routing),
      blacklist_(options_.blacklist_base_seconds, options_.blacklist_backoff,
                 options_.blacklist_max_seconds),
      storage_(options_.limits, /*evict_when_full=*/false),
      cache_(
          [&] {
            StorageLimits limits = options_.limits;
            limits.max_keys = options_.cache_max_keys;
            return limits;
          }(),
          /*evict_when_full=*/true),
      rng_(options_.random_seed != 0 ? options_.random_seed : SeedFrom(self_.peer_id)),
      bootstrap_retry_delay_(options_.bootstrap_retry_seconds) {}

SenderInfo DhtNode::MySender() const {
  SenderInfo sender;
  sender.is_server = !options_.client_mode;
  if (sender.is_server) sender.addresses = self_.addresses;
  return sender;
}

bool DhtNode::IsCallable(const Contact& contact) const {
  if (contact.peer_id == self_.peer_id) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  return !blacklist_.IsBanned(contact.peer_id, clock_->Now());
}

std::vector<Contact> DhtNode::InitialCandidates(const DhtId& target) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const DhtTime now = clock_->Now();
  std::vector<Contact> nearest = table_.Nearest(target, options_.traversal.beam_size);
  nearest.erase(
      std::remove_if(nearest.begin(), nearest.end(),
                     [&](const Contact& c) { return blacklist_.IsBanned(c.peer_id, now); }),
      nearest.end());
  return nearest;
}

// ---- bookkeeping ----

void DhtNode::NoteContactLocked(const Contact& contact, DhtTime now, Deferred& deferred) {
  if (contact.peer_id == self_.peer_id) return;
  blacklist_.Forgive(contact.peer_id);
  const bool was_known = table_.Contains(contact.peer_id);
  RoutingTable::SeenResult seen = table_.Seen(contact, now);
  if (seen.ping_candidate) deferred.pings.push_back(*seen.ping_candidate);
  if (was_known || seen.outcome != RoutingTable::Outcome::kAdded) return;
  if (options_.client_mode || storage_.size() == 0 ||
      storage_.size() > options_.max_keys_for_handoff) {
    return;
  }
  // Kademlia's join rule: a newcomer nearer to a key than the farthest of its current replicas
  // receives the records we hold for that key, if we are the nearest holder (so that only one node
  // does the handing over).
  StoreRequest handoff;
  handoff.sender = MySender();
  for (const DhtId& key : storage_.Keys()) {
    std::vector<Contact> neighbors = table_.Nearest(key, options_.num_replicas, &contact.peer_id);
    const DhtId newcomer = contact.id.Xor(key);
    const bool newcomer_should_store =
        neighbors.size() < options_.num_replicas || newcomer < neighbors.back().id.Xor(key);
    const bool we_are_nearest =
        neighbors.empty() || self_.id.Xor(key) < neighbors.front().id.Xor(key);
    if (!newcomer_should_store || !we_are_nearest) continue;
    auto value = storage_.Get(key, now);
    if (!value) continue;
    for (auto& item : ItemsOf(key, storage_.RawKey(key), *value, /*in_cache=*/false)) {
      handoff.items.push_back(std::move(item));
    }
  }
  if (handoff.items.empty()) return;
  // Keep each request within what the receiver accepts.
  while (!handoff.items.empty()) {
    StoreRequest part;
    part.sender = handoff.sender;
    const size_t n = std::min(handoff.items.size(), options_.max_items_per_store);
    part.items.assign(std::make_move_iterator(handoff.items.end() - static_cast<std::ptrdiff_t>(n)),
                      std::make_move_iterator(handoff.items.end()));
    handoff.items.resize(handoff.items.size() - n);
    deferred.handoffs.emplace_back(contact, std::move(part));
  }
}

void DhtNode::AddSenderLocked(const net::PeerId& from, const SenderInfo& sender, DhtTime now,
                              Deferred& deferred) {
  if (!sender.is_server) return;  // client-mode peers never enter routing tables
  std::vector<std::string> addresses = sender.addresses;
  if (addresses.size() > options_.max_addresses_per_contact) {
    addresses.resize(options_.max_addresses_per_contact);
  }
  NoteContactLocked(Contact(from, std::move(addresses)), now, deferred);
}

void DhtNode::NoteCallResult(const Contact& contact, const Status& status, bool is_server) {
  Deferred deferred;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const DhtTime now = clock_->Now();
    const PeerVerdict verdict = JudgePeer(status);
    if (verdict == PeerVerdict::kAlive) {
      if (is_server) NoteContactLocked(contact, now, deferred);
    } else if (verdict == PeerVerdict::kFailed) {
      blacklist_.RecordFailure(contact.peer_id, now);
      table_.Failed(contact.peer_id);
    }
  }
  RunDeferred(std::move(deferred));
}

void DhtNode::RunDeferred(Deferred deferred) {
  for (const auto& contact : deferred.pings) PingCandidate(contact);
  for (auto& [contact, request] : deferred.handoffs) {
    SendStore(contact, std::move(request), [](Result<StoreResponse>) {});
  }
}

void DhtNode::PingCandidate(const Contact& contact) {
  PingRequest request{MySender()};
  auto self = shared_from_this();
  transport_->Ping(contact, std::move(request), [self, contact](Result<PingResponse> response) {
    Deferred deferred;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      const DhtTime now = self->clock_->Now();
      const PeerVerdict verdict = JudgePeer(response.status());
      if (verdict == PeerVerdict::kAlive) {
        self->NoteContactLocked(contact, now, deferred);
      } else if (verdict == PeerVerdict::kFailed) {
        // It failed a direct liveness check: its bucket's newest replacement takes the place.
        self->blacklist_.RecordFailure(contact.peer_id, now);
        self->table_.Evict(contact.peer_id);
      }
    }
    self->RunDeferred(std::move(deferred));
  });
}

// ---- outgoing calls ----

void DhtNode::SendFind(const Contact& to, std::vector<DhtId> keys,
                       Traversal::FindResultsCallback done) {
  const size_t count = keys.size();
  FindRequest request{MySender(), std::move(keys)};
  auto self = shared_from_this();
  transport_->Find(to, std::move(request),
                   [self, to, count, done = std::move(done)](Result<FindResponse> response) {
                     if (response.ok() && response->results.size() != count) {
                       response = Status(StatusCode::kProtocolError,
                                         "find response from " + to.peer_id.ShortString() +
                                             " has " + std::to_string(response->results.size()) +
                                             " results for " + std::to_string(count) + " keys");
                     }
                     self->NoteCallResult(to, response.status(), true);
                     if (!response.ok()) {
                       done(response.status());
                       return;
                     }
                     done(std::move(response->results));
                   });
}

void DhtNode::SendStore(const Contact& to, StoreRequest request,
                        DhtTransport::Callback<StoreResponse> done) {
  if (to.peer_id == self_.peer_id) {
    done(HandleStore(self_.peer_id, request));
    return;
  }
  const size_t count = request.items.size();
  auto self = shared_from_this();
  transport_->Store(to, std::move(request),
                    [self, to, count, done = std::move(done)](Result<StoreResponse> response) {
                      if (response.ok() && response->errors.size() != count) {
                        response =
                            Status(StatusCode::kProtocolError,
                                   "store response from " + to.peer_id.ShortString() + " answers " +
                                       std::to_string(response->errors.size()) + " of " +
                                       std::to_string(count) + " items");
                      }
                      self->NoteCallResult(to, response.status(), true);
                      done(std::move(response));
                    });
}

void DhtNode::RunTraversal(std::vector<DhtId> targets, Traversal::ResultFn on_result,
                           Traversal::DoneFn done) {
  std::vector<std::vector<Contact>> initial;
  initial.reserve(targets.size());
  for (const auto& target : targets) initial.push_back(InitialCandidates(target));
  auto self = shared_from_this();
  auto find = [self](const Contact& to, std::vector<DhtId> keys,
                     Traversal::FindResultsCallback callback) {
    self->SendFind(to, std::move(keys), std::move(callback));
  };
  // The filter runs under the traversal's lock; it only takes the node's lock, never the reverse.
  auto filter = [self](const Contact& contact) { return self->IsCallable(contact); };
  auto finish = [self, targets, done = std::move(done)](std::vector<TraversalOutcome> outcomes,
                                                        TraversalStats stats) {
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      const DhtTime now = self->clock_->Now();
      for (const auto& target : targets) self->table_.MarkRefreshed(target, now);
    }
    done(std::move(outcomes), stats);
  };
  Traversal::Run(std::move(targets), std::move(initial), options_.traversal, std::move(find),
                 std::move(on_result), std::move(filter), std::move(finish));
}

// ---- bootstrap ----

Future<Empty> DhtNode::Bootstrap(std::vector<Contact> initial_peers) {
  if (initial_peers.empty()) {
    return Future<Empty>::Ready(
        Status(StatusCode::kInvalidArgument, "DHT bootstrap needs at least one initial peer"));
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    bootstrap_peers_ = initial_peers;
  }
  return RunBootstrap(std::move(initial_peers));
}

Future<Empty> DhtNode::RunBootstrap(std::vector<Contact> peers) {
  struct State {
    std::mutex mutex;
    size_t pending;
    size_t answered = 0;
    std::string errors;
    Promise<Empty> promise;
  };
  auto state = std::make_shared<State>();
  state->pending = peers.size();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    bootstrap_running_ = true;
  }
  auto self = shared_from_this();
  auto all_pinged = [self, state, total = peers.size()] {
    if (state->answered == 0) {
      {
        std::lock_guard<std::mutex> lock(self->mutex_);
        self->bootstrap_running_ = false;
        self->next_bootstrap_retry_ = self->clock_->Now() + self->bootstrap_retry_delay_;
        self->bootstrap_retry_delay_ =
            std::min(self->bootstrap_retry_delay_ * 2, self->options_.bootstrap_retry_max_seconds);
      }
      Status failed(StatusCode::kUnavailable, "DHT bootstrap failed: none of the " +
                                                  std::to_string(total) +
                                                  " initial peers answered a ping (" +
                                                  state->errors + "); retrying in the background");
      HM_LOG(kWarning) << failed.ToString();
      state->promise.Set(failed);
      return;
    }
    // Look ourselves up: this fills the buckets near our id and tells our neighbours about us.
    self->RunTraversal({self->self_.id}, nullptr,
                       [self, state](std::vector<TraversalOutcome>, TraversalStats) {
                         {
                           std::lock_guard<std::mutex> lock(self->mutex_);
                           self->bootstrap_running_ = false;
                           self->bootstrapped_ = true;
                           self->bootstrap_retry_delay_ = self->options_.bootstrap_retry_seconds;
                         }
                         state->promise.Set(Empty{});
                       });
  };
  for (const auto& peer : peers) {
    transport_->Ping(
        peer, PingRequest{MySender()},
        [self, state, peer, all_pinged](Result<PingResponse> response) {
          self->NoteCallResult(peer, response.status(), response.ok() && response->is_server);
          bool last;
          {
            std::lock_guard<std::mutex> lock(state->mutex);
            if (response.ok()) {
              state->answered += 1;
            } else {
              if (!state->errors.empty()) state->errors += "; ";
              state->errors += peer.peer_id.ShortString() + ": " + response.status().ToString();
            }
            last = --state->pending == 0;
          }
          if (last) all_pinged();
        });
  }
  return state->promise.future();
}

// ---- find nearest ----

Future<std::vector<std::vector<Contact>>> DhtNode::FindNearest(std::vector<DhtId> ids) {
  Promise<std::vector<std::vector<Contact>>> promise;
  auto future = promise.future();
  RunTraversal(std::move(ids), nullptr,
               [promise](std::vector<TraversalOutcome> outcomes, TraversalStats) {
                 std::vector<std::vector<Contact>> nearest;
                 nearest.reserve(outcomes.size());
                 for (auto& outcome : outcomes) nearest.push_back(std::move(outcome.nearest));
                 promise.Set(std::move(nearest));
               });
  return future;
}

// ---- store ----

Status DhtNode::CheckItemShape(const StoreItem& item) const {
  if (!std::isfinite(item.value.expiration)) {
    return Status(StatusCode::kInvalidArgument, "expiration time is not a finite number");
  }
  if (item.value.value.size() > options_.limits.max_value_bytes) {
    return Status(StatusCode::kResourceExhausted,
                  "value of " + std::to_string(item.value.value.size()) +
                      " bytes exceeds the cap of " +
                      std::to_string(options_.limits.max_value_bytes) + " bytes");
  }
  if (item.subkey && item.subkey->size() > options_.limits.max_subkey_bytes) {
    return Status(StatusCode::kResourceExhausted,
                  "subkey of " + std::to_string(item.subkey->size()) +
                      " bytes exceeds the cap of " +
                      std::to_string(options_.limits.max_subkey_bytes) + " bytes");
  }
  if (item.raw_key && DhtId::OfKey(*item.raw_key) != item.key) {
    return Status(StatusCode::kInvalidArgument, "raw key does not hash to the key id");
  }
  return Status::Ok();
}

std::vector<StoreItem> DhtNode::ItemsOf(const DhtId& key, const std::optional<std::string>& raw_key,
                                        const DhtValue& value, bool in_cache) {
  std::vector<StoreItem> items;
  if (value.regular() && !value.is_dictionary()) {
    items.push_back(StoreItem{key, raw_key, std::nullopt, *value.regular(), in_cache});
  }
  for (const auto& [subkey, entry] : value.dictionary()) {
    items.push_back(StoreItem{key, raw_key, subkey, entry, in_cache});
  }
  return items;
}

Future<StoreOutcome> DhtNode::Store(std::string key, std::string value, DhtTime expiration,
                                    std::optional<std::string> subkey) {
  Promise<StoreOutcome> promise;
  auto future = promise.future();
  StoreMany({StoreRecord{std::move(key), std::move(subkey), std::move(value), expiration}})
      .OnReady([promise](const Result<std::vector<StoreOutcome>>& outcomes) {
        if (!outcomes.ok()) {
          promise.Set(outcomes.status());
        } else {
          promise.Set(outcomes->front());
        }
      });
  return future;
}

Future<std::vector<StoreOutcome>> DhtNode::StoreMany(std::vector<StoreRecord> records) {
  // One group per distinct key: its records travel together to the same replicas.
  struct Group {
    DhtId key;
    std::vector<size_t> records;
    std::vector<Contact> candidates;  // nearest first, ourselves included when we are a server
    size_t next_candidate = 0;
    size_t in_flight = 0;
  };
  struct State {
    std::mutex mutex;
    std::vector<StoreItem> items;  // one per record
    std::vector<StoreOutcome> outcomes;
    std::vector<bool> skip;  // refused before any network traffic
    std::vector<Group> groups;
    size_t groups_in_flight = 0;
    Promise<std::vector<StoreOutcome>> promise;
  };
  auto state = std::make_shared<State>();
  auto future = state->promise.future();
  const DhtTime now = clock_->Now();
  state->items.resize(records.size());
  state->outcomes.resize(records.size());
  state->skip.assign(records.size(), false);
  std::unordered_map<DhtId, size_t> group_of;
  for (size_t i = 0; i < records.size(); ++i) {
    StoreRecord& record = records[i];
    StoreItem& item = state->items[i];
    item.key = DhtId::OfKey(record.key);
    item.subkey = record.subkey;
    item.value = TimedValue{std::move(record.value), record.expiration};
    Status ok = CheckRecordLimits(options_.limits, item.subkey, item.value, now);
    if (ok.ok() && options_.validator) {
      DhtRecord to_sign{item.key, record.key, item.subkey, item.value.value, item.value.expiration};
      auto signed_value = options_.validator->Sign(to_sign);
      if (!signed_value.ok()) {
        ok = signed_value.status();
      } else {
        item.value.value = std::move(signed_value).value();
        to_sign.value = item.value.value;
        if (options_.validator->NeedsRawKey(record.key)) item.raw_key = record.key;
        ok = options_.validator->Validate(to_sign);
        if (ok.ok()) ok = CheckRecordLimits(options_.limits, item.subkey, item.value, now);
      }
    }
    if (!ok.ok()) {
      state->outcomes[i].status = ok;
      state->skip[i] = true;
      continue;
    }
    auto [it, inserted] = group_of.emplace(item.key, state->groups.size());
    if (inserted) state->groups.push_back(Group{item.key, {}, {}, 0, 0});
    state->groups[it->second].records.push_back(i);
  }
  if (state->groups.empty()) {
    state->promise.Set(std::move(state->outcomes));
    return future;
  }

  std::vector<DhtId> keys;
  for (const auto& group : state->groups) keys.push_back(group.key);
  auto self = shared_from_this();

  // Sends the records of each (contact, group) pair, one request per contact. `dispatch` is
  // recursive: a failed replica is replaced by the next candidate.
  auto dispatch = std::make_shared<std::function<void(std::vector<std::pair<size_t, size_t>>)>>();
  *dispatch = [self, state,
               weak_dispatch =
                   std::weak_ptr<std::function<void(std::vector<std::pair<size_t, size_t>>)>>(
                       dispatch)](std::vector<std::pair<size_t, size_t>> assignments) {
    // assignments: (group, candidate index)
    std::unordered_map<net::PeerId, std::pair<Contact, std::vector<size_t>>> by_peer;
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      for (auto [g, c] : assignments) {
        const Contact& contact = state->groups[g].candidates[c];
        auto& slot = by_peer[contact.peer_id];
        slot.first = contact;
        slot.second.push_back(g);
      }
    }
    for (auto& [peer, target] : by_peer) {
      StoreRequest request;
      request.sender = self->MySender();
      std::vector<std::pair<size_t, size_t>> item_owner;  // (group, record)
      {
        std::lock_guard<std::mutex> lock(state->mutex);
        for (size_t g : target.second) {
          for (size_t r : state->groups[g].records) {
            request.items.push_back(state->items[r]);
            item_owner.emplace_back(g, r);
          }
        }
      }
      auto groups = target.second;
      auto contact = target.first;
      self->SendStore(
          contact, std::move(request),
          [self, state, weak_dispatch, groups, item_owner](Result<StoreResponse> response) {
            std::vector<std::pair<size_t, size_t>> retries;
            bool all_done = false;
            {
              std::lock_guard<std::mutex> lock(state->mutex);
              if (response.ok()) {
                for (size_t i = 0; i < item_owner.size(); ++i) {
                  StoreOutcome& outcome = state->outcomes[item_owner[i].second];
                  const std::string& error = response->errors[i];
                  if (error.empty()) {
                    outcome.replicas += 1;
                  } else {
                    outcome.status = Status(StatusCode::kFailedPrecondition, error);
                  }
                }
              }
              for (size_t g : groups) {
                Group& group = state->groups[g];
                group.in_flight -= 1;
                if (!response.ok()) {
                  for (size_t r : group.records) {
                    if (state->outcomes[r].replicas == 0) {
                      state->outcomes[r].status = response.status();
                    }
                  }
                  if (group.next_candidate < group.candidates.size()) {
                    retries.emplace_back(g, group.next_candidate++);
                    group.in_flight += 1;
                    continue;
                  }
                }
                if (group.in_flight == 0) all_done = --state->groups_in_flight == 0;
              }
            }
            if (!retries.empty()) {
              if (auto dispatch_now = weak_dispatch.lock()) (*dispatch_now)(std::move(retries));
            }
            if (all_done) {
              std::vector<StoreOutcome> outcomes;
              {
                std::lock_guard<std::mutex> lock(state->mutex);
                for (size_t r = 0; r < state->outcomes.size(); ++r) {
                  StoreOutcome& outcome = state->outcomes[r];
                  if (outcome.replicas > 0) outcome.status = Status::Ok();
                }
                outcomes = state->outcomes;
              }
              state->promise.Set(std::move(outcomes));
            }
          });
    }
  };

  RunTraversal(
      std::move(keys), nullptr,
      [self, state, dispatch](std::vector<TraversalOutcome> outcomes, TraversalStats) {
        std::vector<std::pair<size_t, size_t>> assignments;
        {
          std::lock_guard<std::mutex> lock(state->mutex);
          for (size_t g = 0; g < state->groups.size(); ++g) {
            Group& group = state->groups[g];
            group.candidates = std::move(outcomes[g].nearest);
            if (!self->options_.client_mode) {
              auto at = std::find_if(
                  group.candidates.begin(), group.candidates.end(),
                  [&](const Contact& c) { return IsNearer(group.key, self->self_.id, c.id); });
              group.candidates.insert(at, self->self_);
            }
            const size_t first = std::min(self->options_.num_replicas, group.candidates.size());
            for (size_t c = 0; c < first; ++c) assignments.emplace_back(g, c);
            group.next_candidate = first;
            group.in_flight = first;
            if (first > 0) state->groups_in_flight += 1;
            for (size_t r : group.records) {
              state->outcomes[r].status =
                  Status(StatusCode::kUnavailable, "no DHT node known to store the record");
            }
          }
        }
        if (state->groups_in_flight == 0) {
          std::vector<StoreOutcome> result;
          {
            std::lock_guard<std::mutex> lock(state->mutex);
            result = state->outcomes;
          }
          state->promise.Set(std::move(result));
          return;
        }
        // Keeps the dispatcher alive until the last answer (it only holds itself weakly).
        auto keep_alive = dispatch;
        state->promise.future().OnReady([keep_alive](const Result<std::vector<StoreOutcome>>&) {});
        (*dispatch)(std::move(assignments));
      });
  return future;
}

// ---- get ----

Future<GetOutcome> DhtNode::Get(std::string key, bool latest) {
  Promise<GetOutcome> promise;
  auto future = promise.future();
  GetMany({std::move(key)}, latest).OnReady([promise](const Result<std::vector<GetOutcome>>& r) {
    if (!r.ok()) {
      promise.Set(r.status());
    } else {
      promise.Set(r->front());
    }
  });
  return future;
}

Future<std::vector<GetOutcome>> DhtNode::GetMany(std::vector<std::string> keys, bool latest) {
  std::vector<DhtId> ids;
  std::vector<std::optional<std::string>> raw_keys;
  const DhtTime now = clock_->Now();
  for (auto& key : keys) {
    ids.push_back(DhtId::OfKey(key));
    raw_keys.emplace_back(std::move(key));
  }
  // Any live value suffices (expiration > now), unless the freshest one is wanted.
  std::vector<DhtTime> sufficient(ids.size(), latest ? kInfinity : now);
  return GetById(std::move(ids), std::move(raw_keys), std::move(sufficient), /*use_local=*/true);
}

Future<std::vector<GetOutcome>> DhtNode::GetById(std::vector<DhtId> ids,
                                                 std::vector<std::optional<std::string>> raw_keys,
                                                 std::vector<DhtTime> sufficient_expiration,
                                                 bool use_local) {
  auto request = std::make_shared<GetRequest>();
  const size_t n = ids.size();
  request->ids = std::move(ids);
  request->raw_keys = std::move(raw_keys);
  request->sufficient = std::move(sufficient_expiration);
  request->values.resize(n);
  request->from_local.assign(n, false);
  request->lacking.resize(n);
  auto future = request->promise.future();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const DhtTime now = clock_->Now();
    request->started = now;
    for (size_t i = 0; i < n; ++i) {
      if (use_local) {
        auto stored = storage_.Get(request->ids[i], now);
        auto cached = cache_.Get(request->ids[i], now);
        if (cached) cache_used_[request->ids[i]] = request->raw_keys[i];
        if (stored && cached) stored->Merge(*cached);
        if (!stored) stored = std::move(cached);
        if (stored) request->values[i] = std::move(stored);
      }
      if (request->values[i] && request->values[i]->latest_expiration() >= request->sufficient[i]) {
        request->from_local[i] = true;
      } else {
        request->pending.push_back(i);
      }
    }
  }
  if (request->pending.empty()) {
    FinishGet(request, {}, TraversalStats{});
    return future;
  }
  std::vector<DhtId> targets;
  for (size_t i : request->pending) targets.push_back(request->ids[i]);
  auto self = shared_from_this();
  auto on_result = [self, request](size_t q, const Contact& from, const FindResult& result,
                                   int) -> bool {
    const size_t i = request->pending[q];
    if (!result.value) {
      request->lacking[i].emplace_back(from.id.Xor(request->ids[i]), from);
      return false;
    }
    DhtValue value = *result.value;
    value.DropExpired(self->clock_->Now());
    self->ValidateValue(request->ids[i], request->raw_keys[i], value);
    if (value.empty()) {
      request->lacking[i].emplace_back(from.id.Xor(request->ids[i]), from);
      return false;
    }
    if (request->values[i]) {
      request->values[i]->Merge(value);
    } else {
      request->values[i] = std::move(value);
    }
    return request->values[i]->latest_expiration() >= request->sufficient[i];
  };
  RunTraversal(std::move(targets), std::move(on_result),
               [self, request](std::vector<TraversalOutcome> outcomes, TraversalStats stats) {
                 self->FinishGet(request, outcomes, stats);
               });
  return future;
}

void DhtNode::FinishGet(const std::shared_ptr<GetRequest>& request,
                        const std::vector<TraversalOutcome>& outcomes,
                        const TraversalStats& stats) {
  const size_t n = request->ids.size();
  std::vector<GetOutcome> results(n);
  std::vector<std::pair<Contact, StoreRequest>> cache_pushes;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const DhtTime now = clock_->Now();
    for (size_t q = 0; q < request->pending.size(); ++q) {
      const size_t i = request->pending[q];
      results[i].hops = q < outcomes.size() ? outcomes[q].hops : 0;
      results[i].requests = stats.requests;
      auto& value = request->values[i];
      if (!value || !value->DropExpired(now)) continue;
      if (options_.cache_locally) cache_.Merge(request->ids[i], *value, now, request->raw_keys[i]);
      // Cache at the nearest nodes that were asked and lacked the value.
      auto& lacking = request->lacking[i];
      std::sort(lacking.begin(), lacking.end(),
                [](const auto& a, const auto& b) { return a.first < b.first; });
      for (size_t j = 0; j < lacking.size() && j < options_.cache_nearest; ++j) {
        StoreRequest push;
        push.sender = MySender();
        const bool raw_needed = options_.validator && request->raw_keys[i] &&
                                options_.validator->NeedsRawKey(*request->raw_keys[i]);
        push.items = ItemsOf(request->ids[i], raw_needed ? request->raw_keys[i] : std::nullopt,
                             *value, /*in_cache=*/true);
        if (push.items.size() > options_.max_items_per_store) break;
        cache_pushes.emplace_back(lacking[j].second, std::move(push));
      }
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (request->values[i]) {
      results[i].value = StripValue(request->ids[i], request->raw_keys[i], *request->values[i]);
    }
  }
  for (auto& [contact, push] : cache_pushes) {
    SendStore(contact, std::move(push), [](Result<StoreResponse>) {});
  }
  request->promise.Set(std::move(results));
}

void DhtNode::ValidateValue(const DhtId& key, const std::optional<std::string>& raw_key,
                            DhtValue& value) const {
  if (!options_.validator) return;
  DhtValue valid;
  if (value.regular()) {
    DhtRecord record{key, raw_key, std::nullopt, value.regular()->value,
                     value.regular()->expiration};
    if (options_.validator->Validate(record).ok()) valid.StoreRegular(*value.regular());
  }
  for (const auto& [subkey, entry] : value.dictionary()) {
    DhtRecord record{key, raw_key, subkey, entry.value, entry.expiration};
    if (options_.validator->Validate(record).ok()) valid.StoreSubkey(subkey, entry);
  }
  value = std::move(valid);
}

DhtValue DhtNode::StripValue(const DhtId& key, const std::optional<std::string>& raw_key,
                             const DhtValue& value) const {
  if (!options_.validator) return value;
  DhtValue stripped;
  if (value.regular()) {
    DhtRecord record{key, raw_key, std::nullopt, value.regular()->value,
                     value.regular()->expiration};
    stripped.StoreRegular(TimedValue{options_.validator->Strip(record), record.expiration});
  }
  for (const auto& [subkey, entry] : value.dictionary()) {
    DhtRecord record{key, raw_key, subkey, entry.value, entry.expiration};
    stripped.StoreSubkey(subkey, TimedValue{options_.validator->Strip(record), entry.expiration});
  }
  return stripped;
}

// ---- maintenance ----

void DhtNode::Maintain() {
  bool retry_bootstrap = false;
  std::vector<Contact> bootstrap_peers;
  std::vector<DhtId> stale;
  std::vector<DhtId> refresh_ids;
  std::vector<std::optional<std::string>> refresh_keys;
  std::vector<DhtTime> refresh_sufficient;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const DhtTime now = clock_->Now();
    storage_.PurgeExpired(now);
    cache_.PurgeExpired(now);
    blacklist_.Purge(now);
    if (!bootstrap_peers_.empty() && table_.size() == 0 && !bootstrap_running_ &&
        now >= next_bootstrap_retry_) {
      retry_bootstrap = true;
      bootstrap_peers = bootstrap_peers_;
    }
    if (table_.size() > 0) {
      stale = table_.StaleBucketTargets(now, options_.bucket_refresh_seconds, rng_);
      for (const auto& target : stale) table_.MarkRefreshed(target, now);
    }
    for (auto it = cache_used_.begin(); it != cache_used_.end();) {
      auto cached = cache_.Get(it->first, now);
      if (!cached) {
        it = cache_used_.erase(it);
        continue;
      }
      const DhtTime expiration = cached->latest_expiration();
      if (expiration - now <= options_.cache_refresh_before_expiry_seconds) {
        refresh_ids.push_back(it->first);
        refresh_keys.push_back(it->second);
        // Only a value fresher than the cached one is worth stopping for.
        refresh_sufficient.push_back(std::nextafter(expiration, kInfinity));
        it = cache_used_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (retry_bootstrap) {
    HM_LOG(kInfo) << "DHT node " << self_.peer_id.ShortString()
                  << " has no contacts; retrying bootstrap";
    RunBootstrap(std::move(bootstrap_peers));
  }
  if (!stale.empty()) FindNearest(std::move(stale));
  if (!refresh_ids.empty()) {
    GetById(std::move(refresh_ids), std::move(refresh_keys), std::move(refresh_sufficient),
            /*use_local=*/false);
  }
}

// ---- serving ----

Result<PingResponse> DhtNode::HandlePing(const net::PeerId& from, const PingRequest& request) {
  Deferred deferred;
  PingResponse response;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const DhtTime now = clock_->Now();
    AddSenderLocked(from, request.sender, now, deferred);
    response.dht_time = now;
    response.is_server = !options_.client_mode;
  }
  RunDeferred(std::move(deferred));
  return response;
}

Result<StoreResponse> DhtNode::HandleStore(const net::PeerId& from, const StoreRequest& request) {
  if (request.items.empty()) {
    return Status(StatusCode::kInvalidArgument, "store request has no items");
  }
  if (request.items.size() > options_.max_items_per_store) {
    return Status(StatusCode::kResourceExhausted, "store request has " +
                                                      std::to_string(request.items.size()) +
                                                      " items, more than the cap of " +
                                                      std::to_string(options_.max_items_per_store));
  }
  for (size_t i = 0; i < request.items.size(); ++i) {
    Status shape = CheckItemShape(request.items[i]);
    if (!shape.ok()) return shape.WithContext("store item " + std::to_string(i));
  }
  StoreResponse response;
  response.errors.resize(request.items.size());
  // Validators may be slow (signatures): run them before taking the lock.
  std::vector<Status> verdicts(request.items.size());
  if (options_.validator) {
    for (size_t i = 0; i < request.items.size(); ++i) {
      const StoreItem& item = request.items[i];
      verdicts[i] = options_.validator->Validate(
          DhtRecord{item.key, item.raw_key, item.subkey, item.value.value, item.value.expiration});
    }
  }
  Deferred deferred;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const DhtTime now = clock_->Now();
    if (from != self_.peer_id) AddSenderLocked(from, request.sender, now, deferred);
    for (size_t i = 0; i < request.items.size(); ++i) {
      const StoreItem& item = request.items[i];
      Status stored = verdicts[i];
      if (stored.ok()) {
        // A client-mode node keeps no replicas for others; its cache only holds what it read.
        if (options_.client_mode && from != self_.peer_id) {
          stored = Status(StatusCode::kFailedPrecondition, "client-mode node stores no records");
        } else {
          RecordStorage& target = item.in_cache ? cache_ : storage_;
          stored = target.Store(item.key, item.subkey, item.value, now, item.raw_key);
        }
      }
      if (!stored.ok()) response.errors[i] = stored.ToString();
    }
  }
  RunDeferred(std::move(deferred));
  return response;
}

Result<FindResponse> DhtNode::HandleFind(const net::PeerId& from, const FindRequest& request) {
  if (request.keys.empty()) {
    return Status(StatusCode::kInvalidArgument, "find request has no keys");
  }
  if (request.keys.size() > options_.max_keys_per_find) {
    return Status(StatusCode::kResourceExhausted,
                  "find request has " + std::to_string(request.keys.size()) +
                      " keys, more than the cap of " + std::to_string(options_.max_keys_per_find));
  }
  FindResponse response;
  response.results.resize(request.keys.size());
  Deferred deferred;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const DhtTime now = clock_->Now();
    AddSenderLocked(from, request.sender, now, deferred);
    for (size_t i = 0; i < request.keys.size(); ++i) {
      const DhtId& key = request.keys[i];
      FindResult& result = response.results[i];
      auto stored = storage_.Get(key, now);
      auto cached = cache_.Get(key, now);
      if (stored && cached) stored->Merge(*cached);
      result.value = stored ? std::move(stored) : std::move(cached);
      result.nearest = table_.Nearest(key, options_.routing.bucket_size, &from);
    }
  }
  RunDeferred(std::move(deferred));
  return response;
}

// ---- introspection ----

DhtNodeStats DhtNode::Stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  DhtNodeStats stats;
  stats.routing_table_size = table_.size();
  stats.stored_keys = storage_.size();
  stats.cached_keys = cache_.size();
  stats.blacklisted = blacklist_.size();
  stats.bootstrapped = bootstrapped_;
  return stats;
}

std::vector<Contact> DhtNode::KnownContacts() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return table_.AllContacts();
}

}  // namespace hivemind::dht
