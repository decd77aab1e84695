// Many DHT nodes in one process on the virtual transport and clock (dht/sim_network.h). Every test
// is deterministic: node ids, latencies and choices come from fixed seeds.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <set>

#include "dht/dht_node.h"
#include "dht/signed_record_validator.h"
#include "dht/sim_network.h"

namespace hivemind::dht {
namespace {

net::PeerId RandomPeer(std::mt19937_64& rng) {
  net::PeerId::Bytes bytes;
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  return net::PeerId(bytes);
}

// A simulated swarm: node 0 starts alone, every other node bootstraps from a random earlier one.
class Swarm {
 public:
  Swarm(size_t size, uint64_t seed, DhtOptions options = {})
      : network_(SimNetwork::Options{0.005, 0.050, 3.0, seed, 1'700'000'000.0}),
        clock_(std::shared_ptr<const Clock>(), &network_),  // non-owning: the swarm owns it
        rng_(seed),
        options_(options) {
    for (size_t i = 0; i < size; ++i) AddNode(/*client_mode=*/false);
  }

  std::shared_ptr<DhtNode> AddNode(bool client_mode, std::optional<net::PeerId> peer = {},
                                   std::optional<DhtOptions> custom = {}) {
    const net::PeerId id = peer ? *peer : RandomPeer(rng_);
    DhtOptions options = custom ? *custom : options_;
    options.client_mode = client_mode;
    auto node = DhtNode::Create(Contact(id, {}), network_.CreateTransport(id), clock_, options);
    if (!client_mode) network_.Attach(id, node);
    if (!nodes_.empty()) {
      std::uniform_int_distribution<size_t> pick(0, nodes_.size() - 1);
      const Contact entry = nodes_[pick(rng_)]->self();
      auto joined = Await(node->Bootstrap({entry}));
      EXPECT_TRUE(joined.ok()) << joined.status().ToString();
    }
    if (!client_mode) nodes_.push_back(node);
    return node;
  }

  template <class T>
  Result<T> Await(Future<T> future) {
    if (!network_.RunUntil([&] { return future.IsReady(); }, 3600)) {
      return Status(StatusCode::kDeadlineExceeded, "simulation ran out of events or time");
    }
    return future.Wait();
  }

  // Kills `fraction` of the nodes (never those in `keep`); returns the indices of the survivors.
  std::vector<size_t> Kill(double fraction) {
    std::vector<size_t> order(nodes_.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng_);
    const size_t victims = static_cast<size_t>(std::round(fraction * nodes_.size()));
    for (size_t i = 0; i < victims; ++i) network_.Kill(nodes_[order[i]]->self().peer_id);
    return std::vector<size_t>(order.begin() + static_cast<std::ptrdiff_t>(victims), order.end());
  }

  DhtNode& node(size_t i) { return *nodes_[i]; }
  size_t size() const { return nodes_.size(); }
  size_t RandomIndex() { return std::uniform_int_distribution<size_t>(0, nodes_.size() - 1)(rng_); }
  SimNetwork& network() { return network_; }
  DhtTime Now() const { return network_.Now(); }
  std::mt19937_64& rng() { return rng_; }

 private:
  SimNetwork network_;
  std::shared_ptr<const Clock> clock_;
  std::mt19937_64 rng_;
  DhtOptions options_;
  std::vector<std::shared_ptr<DhtNode>> nodes_;
};

std::string ValueOf(const GetOutcome& outcome) {
  if (!outcome.value || !outcome.value->regular()) return "<none>";
  return outcome.value->regular()->value;
}

TEST(DhtSimTest, RandomStoresAndGetsAllSucceed) {
  Swarm swarm(256, 11);
  const int kKeys = 100;
  for (int k = 0; k < kKeys; ++k) {
    auto stored = swarm.Await(
        swarm.node(swarm.RandomIndex())
            .Store("key" + std::to_string(k), "value" + std::to_string(k), swarm.Now() + 3600));
    ASSERT_TRUE(stored.ok());
    ASSERT_TRUE(stored->status.ok()) << stored->status.ToString();
    EXPECT_EQ(stored->replicas, 5u) << "key" << k;
  }
  for (int k = 0; k < kKeys; ++k) {
    auto got = swarm.Await(swarm.node(swarm.RandomIndex()).Get("key" + std::to_string(k)));
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(ValueOf(*got), "value" + std::to_string(k));
  }
  // A key nobody stored is simply not found.
  auto missing = swarm.Await(swarm.node(0).Get("never stored"));
  ASSERT_TRUE(missing.ok());
  EXPECT_FALSE(missing->value.has_value());
}

TEST(DhtSimTest, ManyKeysPerRequestInBulkOperations) {
  Swarm swarm(128, 12);
  std::vector<StoreRecord> records;
  std::vector<std::string> keys;
  for (int k = 0; k < 64; ++k) {
    keys.push_back("bulk" + std::to_string(k));
    records.push_back(
        StoreRecord{keys.back(), std::nullopt, "v" + std::to_string(k), swarm.Now() + 600});
  }
  auto stored = swarm.Await(swarm.node(3).StoreMany(records));
  ASSERT_TRUE(stored.ok());
  for (const auto& outcome : *stored) EXPECT_TRUE(outcome.status.ok());
  const uint64_t calls_before = swarm.network().delivered_calls();
  auto got = swarm.Await(swarm.node(77).GetMany(keys));
  ASSERT_TRUE(got.ok());
  for (int k = 0; k < 64; ++k) EXPECT_EQ(ValueOf((*got)[k]), "v" + std::to_string(k));
  // Asking many keys per request costs fewer calls than 64 separate lookups of ~10 calls each.
  EXPECT_LT(swarm.network().delivered_calls() - calls_before, 64u * 10u);
}

// Mean hops and requests of `gets` lookups of stored keys in a swarm of `size` nodes.
std::pair<double, double> MeasureLookups(size_t size, uint64_t seed) {
  DhtOptions options;
  options.cache_locally = false;  // measure routing, not caching
  options.cache_nearest = 0;
  Swarm swarm(size, seed, options);
  const int kKeys = 40;
  for (int k = 0; k < kKeys; ++k) {
    auto stored = swarm.Await(
        swarm.node(swarm.RandomIndex()).Store("h" + std::to_string(k), "v", swarm.Now() + 3600));
    EXPECT_TRUE(stored.ok() && stored->status.ok());
  }
  double hops = 0, requests = 0;
  int found = 0;
  for (int k = 0; k < kKeys; ++k) {
    auto got = swarm.Await(swarm.node(swarm.RandomIndex()).Get("h" + std::to_string(k)));
    EXPECT_TRUE(got.ok());
    if (!got.ok() || !got->value) continue;
    ++found;
    hops += got->hops;
    requests += got->requests;
  }
  EXPECT_EQ(found, kKeys);
  return {hops / found, requests / found};
}

TEST(DhtSimTest, LookupHopsGrowLogarithmically) {
  auto [hops_small, requests_small] = MeasureLookups(64, 21);
  auto [hops_large, requests_large] = MeasureLookups(512, 22);
  std::cout << "N=64: hops " << hops_small << ", requests " << requests_small << "; N=512: hops "
            << hops_large << ", requests " << requests_large << "\n";
  // 8x the nodes: log-like growth means a small additive increase, nowhere near 8x.
  EXPECT_LT(hops_large / hops_small, 2.5);
  EXPECT_LT(requests_large / requests_small, 3.0);
  EXPECT_LE(hops_large, std::log2(512.0));
}

TEST(DhtSimTest, GetsSucceedAfterTenPercentOfNodesDie) {
  Swarm swarm(256, 31);
  const int kKeys = 100;
  for (int k = 0; k < kKeys; ++k) {
    auto stored = swarm.Await(
        swarm.node(swarm.RandomIndex())
            .Store("k" + std::to_string(k), "v" + std::to_string(k), swarm.Now() + 3600));
    ASSERT_TRUE(stored.ok() && stored->status.ok());
  }
  std::vector<size_t> alive = swarm.Kill(0.10);
  ASSERT_EQ(alive.size(), 256u - 26u);
  std::uniform_int_distribution<size_t> pick(0, alive.size() - 1);
  for (int k = 0; k < kKeys; ++k) {
    auto got = swarm.Await(swarm.node(alive[pick(swarm.rng())]).Get("k" + std::to_string(k)));
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(ValueOf(*got), "v" + std::to_string(k)) << "key k" << k;
  }
  // New records can still be stored on a full set of live replicas.
  auto stored = swarm.Await(swarm.node(alive[0]).Store("after", "x", swarm.Now() + 60));
  ASSERT_TRUE(stored.ok());
  EXPECT_TRUE(stored->status.ok());
  EXPECT_EQ(stored->replicas, 5u);
}

TEST(DhtSimTest, RecordsExpireOnTheVirtualClock) {
  Swarm swarm(64, 41);
  auto stored = swarm.Await(swarm.node(1).Store("ephemeral", "v", swarm.Now() + 60));
  ASSERT_TRUE(stored.ok() && stored->status.ok());
  auto before = swarm.Await(swarm.node(2).Get("ephemeral"));
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(ValueOf(*before), "v");
  swarm.network().RunFor(61);
  auto after = swarm.Await(swarm.node(3).Get("ephemeral"));
  ASSERT_TRUE(after.ok());
  EXPECT_FALSE(after->value.has_value());
  // Node 2 cached it; its cache expired too.
  auto cached = swarm.Await(swarm.node(2).Get("ephemeral"));
  ASSERT_TRUE(cached.ok());
  EXPECT_FALSE(cached->value.has_value());
  for (size_t i = 0; i < swarm.size(); ++i) swarm.node(i).Maintain();
  for (size_t i = 0; i < swarm.size(); ++i) EXPECT_EQ(swarm.node(i).Stats().stored_keys, 0u);
  // Storing something already expired is refused up front.
  auto late = swarm.Await(swarm.node(1).Store("late", "v", swarm.Now() - 1));
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(late->status.code(), StatusCode::kInvalidArgument);
}

TEST(DhtSimTest, SubkeysFromDifferentNodesMerge) {
  Swarm swarm(64, 51);
  const DhtTime t = swarm.Now();
  auto a = swarm.Await(swarm.node(5).Store("group", "alice", t + 100, std::string("a")));
  auto b = swarm.Await(swarm.node(9).Store("group", "bob", t + 200, std::string("b")));
  ASSERT_TRUE(a.ok() && a->status.ok() && b.ok() && b->status.ok());
  auto got = swarm.Await(swarm.node(20).Get("group"));
  ASSERT_TRUE(got.ok() && got->value);
  ASSERT_TRUE(got->value->is_dictionary());
  EXPECT_EQ(got->value->dictionary().size(), 2u);
  EXPECT_EQ(got->value->dictionary().at("a").value, "alice");
  EXPECT_EQ(got->value->dictionary().at("b").value, "bob");
  // An older write of a subkey is refused; a newer one replaces it.
  auto stale = swarm.Await(swarm.node(7).Store("group", "old", t + 50, std::string("a")));
  ASSERT_TRUE(stale.ok());
  EXPECT_EQ(stale->status.code(), StatusCode::kFailedPrecondition);
  auto newer = swarm.Await(swarm.node(7).Store("group", "alice2", t + 150, std::string("a")));
  ASSERT_TRUE(newer.ok() && newer->status.ok());
  auto again = swarm.Await(swarm.node(30).Get("group", /*latest=*/true));
  ASSERT_TRUE(again.ok() && again->value);
  EXPECT_EQ(again->value->dictionary().at("a").value, "alice2");
}

TEST(DhtSimTest, LatestFindsTheFreshestReplica) {
  Swarm swarm(128, 61);
  const DhtTime t = swarm.Now();
  auto stored = swarm.Await(swarm.node(0).Store("model", "v1", t + 100));
  ASSERT_TRUE(stored.ok() && stored->status.ok());
  // A newer version reaches only one replica (its writer crashed, say).
  auto nearest = swarm.Await(swarm.node(0).FindNearest({DhtId::OfKey("model")}));
  ASSERT_TRUE(nearest.ok());
  ASSERT_GE((*nearest)[0].size(), 5u);
  const Contact lone = (*nearest)[0][4];
  StoreRequest partial;
  partial.items.push_back(StoreItem{DhtId::OfKey("model"), std::nullopt, std::nullopt,
                                    TimedValue{"v2", t + 200}, false});
  for (size_t i = 0; i < swarm.size(); ++i) {
    if (swarm.node(i).self().peer_id == lone.peer_id) {
      auto response = swarm.node(i).HandleStore(swarm.node(0).self().peer_id, partial);
      ASSERT_TRUE(response.ok());
      EXPECT_EQ(response->errors[0], "");
    }
  }
  for (int trial = 0; trial < 10; ++trial) {
    auto got = swarm.Await(swarm.node(swarm.RandomIndex()).Get("model", /*latest=*/true));
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(ValueOf(*got), "v2");
  }
}

TEST(DhtSimTest, BootstrapFailsClearlyAndRetriesInTheBackground) {
  Swarm swarm(16, 71);
  std::mt19937_64 rng(72);
  const net::PeerId absent = RandomPeer(rng);
  const net::PeerId lonely = RandomPeer(rng);
  DhtOptions options;
  options.bootstrap_retry_seconds = 5;
  auto node = DhtNode::Create(
      Contact(lonely, {}), swarm.network().CreateTransport(lonely),
      std::shared_ptr<const Clock>(std::shared_ptr<const Clock>(), &swarm.network()), options);
  swarm.network().Attach(lonely, node);
  // The initial peer is down: a clear error, no crash.
  auto failed = swarm.Await(node->Bootstrap({Contact(absent, {})}));
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(failed.status().message().find("none of the 1 initial peers"), std::string::npos)
      << failed.status().ToString();
  EXPECT_FALSE(node->Stats().bootstrapped);
  // The peer comes up (here: an existing swarm member takes that identity's place).
  auto host = DhtNode::Create(
      Contact(absent, {}), swarm.network().CreateTransport(absent),
      std::shared_ptr<const Clock>(std::shared_ptr<const Clock>(), &swarm.network()), DhtOptions{});
  swarm.network().Attach(absent, host);
  ASSERT_TRUE(swarm.Await(host->Bootstrap({swarm.node(0).self()})).ok());
  // Maintenance retries once the backoff has passed.
  for (int tick = 0; tick < 20 && !node->Stats().bootstrapped; ++tick) {
    swarm.network().RunFor(1);
    node->Maintain();
  }
  swarm.network().RunUntil([&] { return node->Stats().bootstrapped; }, 60);
  EXPECT_TRUE(node->Stats().bootstrapped);
  EXPECT_GT(node->Stats().routing_table_size, 5u);
}

TEST(DhtSimTest, ClientModeNodesGetAndStoreButNeverEnterRoutingTables) {
  Swarm swarm(64, 81);
  auto client = swarm.AddNode(/*client_mode=*/true);
  auto stored = swarm.Await(client->Store("from client", "c", swarm.Now() + 100));
  ASSERT_TRUE(stored.ok());
  EXPECT_TRUE(stored->status.ok()) << stored->status.ToString();
  EXPECT_EQ(stored->replicas, 5u);  // all on servers
  EXPECT_EQ(client->Stats().stored_keys, 0u);
  auto got = swarm.Await(swarm.node(10).Get("from client"));
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(ValueOf(*got), "c");
  auto back = swarm.Await(client->Get("from client"));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(ValueOf(*back), "c");
  for (size_t i = 0; i < swarm.size(); ++i) {
    for (const auto& contact : swarm.node(i).KnownContacts()) {
      EXPECT_NE(contact.peer_id, client->self().peer_id) << "node " << i;
    }
  }
}

TEST(DhtSimTest, RecordsAreHandedToACloserNewcomer) {
  Swarm swarm(64, 91);
  auto stored = swarm.Await(swarm.node(0).Store("handoff", "h", swarm.Now() + 600));
  ASSERT_TRUE(stored.ok() && stored->status.ok());
  // Find an identity nearer to the key than every current node.
  const DhtId key = DhtId::OfKey("handoff");
  DhtId nearest_existing = swarm.node(0).self().id;
  for (size_t i = 0; i < swarm.size(); ++i) {
    if (IsNearer(key, swarm.node(i).self().id, nearest_existing)) {
      nearest_existing = swarm.node(i).self().id;
    }
  }
  std::mt19937_64 rng(92);
  net::PeerId newcomer_id;
  do {
    newcomer_id = RandomPeer(rng);
  } while (!IsNearer(key, DhtId::OfPeer(newcomer_id), nearest_existing));
  auto newcomer = swarm.AddNode(false, newcomer_id);
  swarm.network().RunFor(5);  // let the handoff stores land
  EXPECT_EQ(newcomer->Stats().stored_keys, 1u);
}

TEST(DhtSimTest, DeadNodesLeaveRoutingTables) {
  Swarm swarm(64, 101);
  std::vector<size_t> alive = swarm.Kill(0.25);
  std::set<net::PeerId> alive_ids;
  for (size_t i : alive) alive_ids.insert(swarm.node(i).self().peer_id);
  DhtNode& observer = swarm.node(alive[0]);
  auto count_dead = [&] {
    size_t dead = 0;
    for (const auto& c : observer.KnownContacts()) dead += alive_ids.count(c.peer_id) == 0;
    return dead;
  };
  const size_t dead_before = count_dead();
  ASSERT_GT(dead_before, 0u);
  // Lookups run into the dead nodes, which fail, get banned and then dropped.
  for (int round = 0; round < 6; ++round) {
    std::vector<DhtId> targets;
    for (int i = 0; i < 16; ++i) targets.push_back(DhtId::Random(swarm.rng()));
    ASSERT_TRUE(swarm.Await(observer.FindNearest(targets)).ok());
    swarm.network().RunFor(30);  // bans expire, so the next round calls them again
  }
  EXPECT_LT(count_dead(), dead_before);
  EXPECT_GT(observer.Stats().routing_table_size, 10u);
}

TEST(DhtSimTest, SignedRecordsOnlyTheirOwnerCanWrite) {
  DhtOptions verify_only;
  verify_only.validator = std::make_shared<SignedRecordValidator>();
  Swarm swarm(64, 111, verify_only);
  const net::Identity alice = net::Identity::Generate();
  const net::Identity mallory = net::Identity::Generate();
  DhtOptions alice_options = verify_only, mallory_options = verify_only;
  alice_options.validator = std::make_shared<SignedRecordValidator>(alice);
  mallory_options.validator = std::make_shared<SignedRecordValidator>(mallory);
  auto alice_node = swarm.AddNode(false, {}, alice_options);
  auto mallory_node = swarm.AddNode(false, {}, mallory_options);
  const std::string subkey = SignedRecordValidator::OwnerMarker(alice.peer_id());
  const DhtTime t = swarm.Now();

  auto v1 = swarm.Await(alice_node->Store("run_progress", "epoch=1", t + 100, subkey));
  ASSERT_TRUE(v1.ok() && v1->status.ok()) << v1->status.ToString();
  auto got = swarm.Await(swarm.node(3).Get("run_progress"));
  ASSERT_TRUE(got.ok() && got->value);
  EXPECT_EQ(got->value->dictionary().at(subkey).value, "epoch=1");  // signature stripped

  // Mallory's node refuses to sign for Alice.
  auto forged = swarm.Await(mallory_node->Store("run_progress", "epoch=999", t + 200, subkey));
  ASSERT_TRUE(forged.ok());
  EXPECT_EQ(forged->status.code(), StatusCode::kPermissionDenied) << forged->status.ToString();

  // A hand-made request with Mallory's signature is refused by every storing node.
  const DhtId key = DhtId::OfKey("run_progress");
  DhtRecord as_mallory{key, std::nullopt, SignedRecordValidator::OwnerMarker(mallory.peer_id()),
                       "epoch=999", t + 200};
  const std::string mallory_signed = *SignedRecordValidator(mallory).Sign(as_mallory);
  StoreRequest attack;
  attack.items.push_back(
      StoreItem{key, std::nullopt, subkey, TimedValue{mallory_signed, t + 200}, false});
  for (size_t i = 0; i < swarm.size(); ++i) {
    auto response = swarm.node(i).HandleStore(mallory_node->self().peer_id, attack);
    ASSERT_TRUE(response.ok());
    EXPECT_NE(response->errors[0].find("PERMISSION_DENIED"), std::string::npos);
  }

  // Alice's newer record wins; replaying her older signed record is refused.
  DhtRecord old_record{key, std::nullopt, subkey, "epoch=1", t + 100};
  const std::string old_signed = *SignedRecordValidator(alice).Sign(old_record);
  auto v2 = swarm.Await(alice_node->Store("run_progress", "epoch=2", t + 150, subkey));
  ASSERT_TRUE(v2.ok() && v2->status.ok());
  StoreRequest replay;
  replay.items.push_back(
      StoreItem{key, std::nullopt, subkey, TimedValue{old_signed, t + 100}, false});
  auto nearest = swarm.Await(swarm.node(0).FindNearest({key}));
  ASSERT_TRUE(nearest.ok());
  for (size_t i = 0; i < swarm.size(); ++i) {
    if (swarm.node(i).self().peer_id != (*nearest)[0][0].peer_id) continue;
    auto response = swarm.node(i).HandleStore(mallory_node->self().peer_id, replay);
    ASSERT_TRUE(response.ok());
    EXPECT_NE(response->errors[0].find("later expiration"), std::string::npos)
        << response->errors[0];
  }
  auto latest = swarm.Await(swarm.node(9).Get("run_progress", /*latest=*/true));
  ASSERT_TRUE(latest.ok() && latest->value);
  EXPECT_EQ(latest->value->dictionary().at(subkey).value, "epoch=2");
}

}  // namespace
}  // namespace hivemind::dht
