// Unit tests of the k-bucket routing table: split rule, nearest-node queries, replacement cache,
// eviction after failures and stale-bucket refresh targets.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "dht/routing_table.h"

namespace hivemind::dht {
namespace {

constexpr DhtTime kNow = 1'000'000.0;

net::PeerId RandomPeer(std::mt19937_64& rng) {
  net::PeerId::Bytes bytes;
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  return net::PeerId(bytes);
}

Contact RandomContact(std::mt19937_64& rng) { return Contact(RandomPeer(rng), {}); }

TEST(RoutingTableTest, NearestMatchesBruteForce) {
  std::mt19937_64 rng(1);
  const Contact self = RandomContact(rng);
  RoutingTableOptions options;
  options.bucket_size = 8;
  RoutingTable table(self.id, options);
  std::vector<Contact> inserted;
  for (int i = 0; i < 500; ++i) {
    Contact c = RandomContact(rng);
    if (table.Seen(c, kNow).outcome == RoutingTable::Outcome::kAdded) inserted.push_back(c);
  }
  EXPECT_EQ(table.size(), inserted.size());
  EXPECT_GT(table.bucket_count(), 4u);
  for (int trial = 0; trial < 20; ++trial) {
    const DhtId target = DhtId::Random(rng);
    auto expected = inserted;
    std::sort(expected.begin(), expected.end(),
              [&](const Contact& a, const Contact& b) { return IsNearer(target, a.id, b.id); });
    auto nearest = table.Nearest(target, 5);
    ASSERT_EQ(nearest.size(), 5u);
    for (size_t i = 0; i < 5; ++i) EXPECT_EQ(nearest[i].peer_id, expected[i].peer_id);
  }
}

TEST(RoutingTableTest, KeepsEveryNodeNearOwnIdAndFewFarAway) {
  std::mt19937_64 rng(2);
  const Contact self = RandomContact(rng);
  RoutingTableOptions options;
  options.bucket_size = 4;
  options.depth_modulo = 1;  // strict Kademlia: split only the bucket holding our own id
  RoutingTable table(self.id, options);
  size_t far_added = 0;
  for (int i = 0; i < 200; ++i) {
    // Ids whose first bit differs from ours all land in the one bucket of the far half.
    Contact c = RandomContact(rng);
    if (c.id.Bit(0) == self.id.Bit(0)) continue;
    if (table.Seen(c, kNow).outcome == RoutingTable::Outcome::kAdded) ++far_added;
  }
  EXPECT_EQ(far_added, 4u);
  // A node sharing a long prefix with us always finds room (its bucket is split as needed).
  net::PeerId::Bytes bytes{};
  Contact near;
  for (uint64_t attempt = 0;; ++attempt) {
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    near = Contact(net::PeerId(bytes), {});
    if (near.id.CommonPrefixBits(self.id) >= 8) break;
  }
  EXPECT_EQ(table.Seen(near, kNow).outcome, RoutingTable::Outcome::kAdded);
}

TEST(RoutingTableTest, FullBucketCachesReplacementAndOffersStalestToPing) {
  std::mt19937_64 rng(3);
  const Contact self = RandomContact(rng);
  RoutingTableOptions options;
  options.bucket_size = 2;
  options.depth_modulo = 1;
  options.ping_after_silence_seconds = 60;
  RoutingTable table(self.id, options);
  std::vector<Contact> far;
  while (far.size() < 4) {
    Contact c = RandomContact(rng);
    if (c.id.Bit(0) != self.id.Bit(0)) far.push_back(c);
  }
  EXPECT_EQ(table.Seen(far[0], kNow).outcome, RoutingTable::Outcome::kAdded);
  EXPECT_EQ(table.Seen(far[1], kNow + 1).outcome, RoutingTable::Outcome::kAdded);
  auto recent = table.Seen(far[2], kNow + 2);
  EXPECT_EQ(recent.outcome, RoutingTable::Outcome::kCachedReplacement);
  EXPECT_FALSE(recent.ping_candidate.has_value());  // the oldest was heard from just now
  auto later = table.Seen(far[3], kNow + 100);
  ASSERT_TRUE(later.ping_candidate.has_value());
  EXPECT_EQ(later.ping_candidate->peer_id, far[0].peer_id);
  // The stalest fails its ping: the newest replacement takes its place.
  EXPECT_TRUE(table.Evict(far[0].peer_id));
  EXPECT_FALSE(table.Contains(far[0].peer_id));
  EXPECT_TRUE(table.Contains(far[3].peer_id));
  EXPECT_EQ(table.size(), 2u);
}

TEST(RoutingTableTest, DropsContactsAfterRepeatedFailuresAndSuccessResets) {
  std::mt19937_64 rng(4);
  const Contact self = RandomContact(rng);
  RoutingTableOptions options;
  options.failures_to_evict = 2;
  RoutingTable table(self.id, options);
  Contact c = RandomContact(rng);
  table.Seen(c, kNow);
  EXPECT_FALSE(table.Failed(c.peer_id));
  table.Seen(c, kNow + 1);  // success forgives
  EXPECT_FALSE(table.Failed(c.peer_id));
  EXPECT_TRUE(table.Contains(c.peer_id));
  EXPECT_TRUE(table.Failed(c.peer_id));
  EXPECT_FALSE(table.Contains(c.peer_id));
}

TEST(RoutingTableTest, IgnoresSelfAndUpdatesAddresses) {
  std::mt19937_64 rng(5);
  const Contact self = RandomContact(rng);
  RoutingTable table(self.id, RoutingTableOptions{});
  EXPECT_EQ(table.Seen(self, kNow).outcome, RoutingTable::Outcome::kIgnored);
  Contact c(RandomPeer(rng), {"/ip4/1.2.3.4/tcp/1"});
  table.Seen(c, kNow);
  c.addresses = {"/ip4/5.6.7.8/tcp/2"};
  EXPECT_EQ(table.Seen(c, kNow + 1).outcome, RoutingTable::Outcome::kUpdated);
  EXPECT_EQ(table.Nearest(c.id, 1)[0].addresses[0], "/ip4/5.6.7.8/tcp/2");
  EXPECT_TRUE(table.Nearest(c.id, 5, &c.peer_id).empty());
}

TEST(RoutingTableTest, StaleBucketsYieldTargetsInsideThem) {
  std::mt19937_64 rng(6);
  const Contact self = RandomContact(rng);
  RoutingTableOptions options;
  options.bucket_size = 2;
  RoutingTable table(self.id, options);
  for (int i = 0; i < 50; ++i) table.Seen(RandomContact(rng), kNow);
  EXPECT_TRUE(table.StaleBucketTargets(kNow + 10, 600, rng).empty());
  auto targets = table.StaleBucketTargets(kNow + 600, 600, rng);
  EXPECT_EQ(targets.size(), table.bucket_count());
  for (const auto& target : targets) table.MarkRefreshed(target, kNow + 600);
  EXPECT_TRUE(table.StaleBucketTargets(kNow + 601, 600, rng).empty());
}

}  // namespace
}  // namespace hivemind::dht
