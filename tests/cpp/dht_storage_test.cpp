// Unit tests of the DHT's record semantics: DhtId, DhtValue (the merge rules), RecordStorage (caps
// and expiration) and the Blacklist.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "dht/blacklist.h"
#include "dht/dht_id.h"
#include "dht/dht_value.h"
#include "dht/record_storage.h"

namespace hivemind::dht {
namespace {

constexpr DhtTime kNow = 1'000'000.0;

TEST(DhtIdTest, KeysHashDeterministicallyAndDistinctly) {
  EXPECT_EQ(DhtId::OfKey("expert.3"), DhtId::OfKey("expert.3"));
  EXPECT_NE(DhtId::OfKey("expert.3"), DhtId::OfKey("expert.4"));
  EXPECT_EQ(DhtId::OfKey("").ToHex().size(), 40u);
}

TEST(DhtIdTest, XorDistanceAndCommonPrefix) {
  std::mt19937_64 rng(7);
  DhtId a = DhtId::Random(rng);
  EXPECT_EQ(a.Xor(a), DhtId());
  EXPECT_EQ(a.CommonPrefixBits(a), DhtId::kBits);
  DhtId b = a.WithBit(13, !a.Bit(13));
  EXPECT_EQ(a.CommonPrefixBits(b), 13);
  DhtId c = a.WithBit(100, !a.Bit(100));
  EXPECT_TRUE(IsNearer(a, c, b));  // differs only far down: nearer
  DhtId inside = DhtId::RandomWithPrefix(a, 40, rng);
  EXPECT_GE(inside.CommonPrefixBits(a), 40);
}

TEST(DhtIdTest, FromBytesRejectsWrongLength) {
  auto bad = DhtId::FromBytes("short");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  DhtId id = DhtId::OfKey("x");
  auto good = DhtId::FromBytes(id.raw());
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, id);
}

TEST(DhtValueTest, NewerExpirationWins) {
  DhtValue value = DhtValue::Regular("old", kNow + 10);
  EXPECT_FALSE(value.StoreRegular({"older", kNow + 5}));
  EXPECT_EQ(value.regular()->value, "old");
  EXPECT_TRUE(value.StoreRegular({"new", kNow + 20}));
  EXPECT_EQ(value.regular()->value, "new");
  // Storing the same record again is not an error: it is there.
  EXPECT_TRUE(value.StoreRegular({"new", kNow + 20}));
}

TEST(DhtValueTest, EqualExpirationsResolveTheSameWayInAnyOrder) {
  DhtValue ab = DhtValue::Regular("a", kNow + 10);
  ab.StoreRegular({"b", kNow + 10});
  DhtValue ba = DhtValue::Regular("b", kNow + 10);
  ba.StoreRegular({"a", kNow + 10});
  EXPECT_EQ(ab, ba);
}

TEST(DhtValueTest, SubkeysMergeAndRegularValuesOverwriteOlderSubkeys) {
  DhtValue value = DhtValue::Regular("plain", kNow + 10);
  EXPECT_FALSE(value.StoreSubkey("s", {"too old", kNow + 5}));
  EXPECT_TRUE(value.StoreSubkey("s1", {"v1", kNow + 20}));
  EXPECT_TRUE(value.StoreSubkey("s2", {"v2", kNow + 30}));
  EXPECT_TRUE(value.is_dictionary());
  EXPECT_EQ(value.dictionary().size(), 2u);
  EXPECT_FALSE(value.StoreSubkey("s1", {"stale", kNow + 15}));
  EXPECT_EQ(value.dictionary().at("s1").value, "v1");
  // A regular value older than the newest subkey is not visible, and drops the subkeys it outlives.
  EXPECT_FALSE(value.StoreRegular({"mid", kNow + 25}));
  EXPECT_EQ(value.dictionary().size(), 1u);
  EXPECT_EQ(value.dictionary().count("s2"), 1u);
  // One newer than everything replaces the dictionary.
  EXPECT_TRUE(value.StoreRegular({"final", kNow + 40}));
  EXPECT_FALSE(value.is_dictionary());
  EXPECT_EQ(value.regular()->value, "final");
  EXPECT_DOUBLE_EQ(value.latest_expiration(), kNow + 40);
}

TEST(DhtValueTest, MergeIsOrderIndependent) {
  std::mt19937_64 rng(42);
  for (int round = 0; round < 50; ++round) {
    std::vector<DhtValue> writes;
    for (int i = 0; i < 8; ++i) {
      const DhtTime expiration = kNow + static_cast<double>(rng() % 20);
      const std::string payload = "v" + std::to_string(rng() % 3);
      if (rng() % 3 == 0) {
        writes.push_back(DhtValue::Regular(payload, expiration));
      } else {
        writes.push_back(DhtValue::Subkey("s" + std::to_string(rng() % 3), payload, expiration));
      }
    }
    DhtValue forward, backward, shuffled_twice;
    for (const auto& w : writes) forward.Merge(w);
    for (auto it = writes.rbegin(); it != writes.rend(); ++it) backward.Merge(*it);
    std::shuffle(writes.begin(), writes.end(), rng);
    for (const auto& w : writes) shuffled_twice.Merge(w);
    for (const auto& w : writes) shuffled_twice.Merge(w);  // idempotent
    EXPECT_EQ(forward, backward) << "round " << round;
    EXPECT_EQ(forward, shuffled_twice) << "round " << round;
  }
}

TEST(DhtValueTest, ExpiredEntriesAreDropped) {
  DhtValue value = DhtValue::Subkey("a", "1", kNow + 5);
  value.StoreSubkey("b", {"2", kNow + 50});
  EXPECT_TRUE(value.DropExpired(kNow + 10));
  EXPECT_EQ(value.dictionary().size(), 1u);
  EXPECT_FALSE(value.DropExpired(kNow + 50));  // expiring exactly now is expired
  EXPECT_TRUE(value.empty());
}

TEST(RecordStorageTest, ExpiredRecordsAreNeverReturned) {
  RecordStorage storage(StorageLimits{}, false);
  const DhtId key = DhtId::OfKey("k");
  ASSERT_TRUE(storage.Store(key, std::nullopt, {"v", kNow + 10}, kNow).ok());
  ASSERT_TRUE(storage.Get(key, kNow + 9.9).has_value());
  EXPECT_FALSE(storage.Get(key, kNow + 10).has_value());
  EXPECT_EQ(storage.size(), 0u);
}

TEST(RecordStorageTest, RefusesExpiredTooDistantAndOversizedRecords) {
  StorageLimits limits;
  limits.max_ttl_seconds = 100;
  limits.max_value_bytes = 8;
  limits.max_subkey_bytes = 4;
  RecordStorage storage(limits, false);
  const DhtId key = DhtId::OfKey("k");
  Status expired = storage.Store(key, std::nullopt, {"v", kNow - 1}, kNow);
  EXPECT_EQ(expired.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(expired.message().find("expired"), std::string::npos) << expired.ToString();
  Status distant = storage.Store(key, std::nullopt, {"v", kNow + 101}, kNow);
  EXPECT_EQ(distant.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(distant.message().find("cap"), std::string::npos) << distant.ToString();
  Status big = storage.Store(key, std::nullopt, {"123456789", kNow + 10}, kNow);
  EXPECT_EQ(big.code(), StatusCode::kResourceExhausted);
  Status big_subkey = storage.Store(key, std::string("12345"), {"v", kNow + 10}, kNow);
  EXPECT_EQ(big_subkey.code(), StatusCode::kResourceExhausted);
  Status nan = storage.Store(key, std::nullopt, {"v", std::nan("")}, kNow);
  EXPECT_EQ(nan.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(storage.size(), 0u);
}

TEST(RecordStorageTest, OlderWriteReportsFailedPrecondition) {
  RecordStorage storage(StorageLimits{}, false);
  const DhtId key = DhtId::OfKey("k");
  ASSERT_TRUE(storage.Store(key, std::nullopt, {"new", kNow + 20}, kNow).ok());
  Status old = storage.Store(key, std::nullopt, {"old", kNow + 10}, kNow);
  EXPECT_EQ(old.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(storage.Get(key, kNow)->regular()->value, "new");
}

TEST(RecordStorageTest, CapsSubkeysAndKeys) {
  StorageLimits limits;
  limits.max_subkeys_per_key = 2;
  limits.max_keys = 2;
  RecordStorage storage(limits, false);
  const DhtId key = DhtId::OfKey("k");
  ASSERT_TRUE(storage.Store(key, std::string("a"), {"1", kNow + 10}, kNow).ok());
  ASSERT_TRUE(storage.Store(key, std::string("b"), {"1", kNow + 10}, kNow).ok());
  EXPECT_EQ(storage.Store(key, std::string("c"), {"1", kNow + 10}, kNow).code(),
            StatusCode::kResourceExhausted);
  EXPECT_TRUE(storage.Store(key, std::string("a"), {"2", kNow + 11}, kNow).ok());  // update is fine
  ASSERT_TRUE(storage.Store(DhtId::OfKey("k2"), std::nullopt, {"1", kNow + 10}, kNow).ok());
  EXPECT_EQ(storage.Store(DhtId::OfKey("k3"), std::nullopt, {"1", kNow + 10}, kNow).code(),
            StatusCode::kResourceExhausted);
  // Room frees up as records expire.
  EXPECT_TRUE(storage.Store(DhtId::OfKey("k3"), std::nullopt, {"1", kNow + 30}, kNow + 10).ok());
}

TEST(RecordStorageTest, CacheEvictsTheSoonestToExpire) {
  StorageLimits limits;
  limits.max_keys = 2;
  RecordStorage cache(limits, true);
  ASSERT_TRUE(cache.Store(DhtId::OfKey("soon"), std::nullopt, {"1", kNow + 10}, kNow).ok());
  ASSERT_TRUE(cache.Store(DhtId::OfKey("late"), std::nullopt, {"1", kNow + 50}, kNow).ok());
  ASSERT_TRUE(cache.Store(DhtId::OfKey("new"), std::nullopt, {"1", kNow + 30}, kNow).ok());
  EXPECT_FALSE(cache.Get(DhtId::OfKey("soon"), kNow).has_value());
  EXPECT_TRUE(cache.Get(DhtId::OfKey("late"), kNow).has_value());
  EXPECT_TRUE(cache.Get(DhtId::OfKey("new"), kNow).has_value());
}

TEST(RecordStorageTest, RemembersRawKeys) {
  RecordStorage storage(StorageLimits{}, false);
  const DhtId key = DhtId::OfKey("raw");
  ASSERT_TRUE(storage.Store(key, std::nullopt, {"v", kNow + 10}, kNow, std::string("raw")).ok());
  EXPECT_EQ(storage.RawKey(key), std::optional<std::string>("raw"));
}

TEST(BlacklistTest, BackoffDoublesAndSuccessForgives) {
  Blacklist blacklist(5, 2, 100);
  net::PeerId peer(net::PeerId::Bytes{1});
  EXPECT_FALSE(blacklist.IsBanned(peer, kNow));
  blacklist.RecordFailure(peer, kNow);
  EXPECT_DOUBLE_EQ(blacklist.BannedUntil(peer), kNow + 5);
  blacklist.RecordFailure(peer, kNow + 1);  // during the ban: no extra strike
  EXPECT_DOUBLE_EQ(blacklist.BannedUntil(peer), kNow + 5);
  blacklist.RecordFailure(peer, kNow + 5);
  EXPECT_DOUBLE_EQ(blacklist.BannedUntil(peer), kNow + 15);
  blacklist.RecordFailure(peer, kNow + 15);
  EXPECT_DOUBLE_EQ(blacklist.BannedUntil(peer), kNow + 35);
  EXPECT_TRUE(blacklist.IsBanned(peer, kNow + 34));
  EXPECT_FALSE(blacklist.IsBanned(peer, kNow + 35));
  blacklist.Forgive(peer);
  blacklist.RecordFailure(peer, kNow + 40);
  EXPECT_DOUBLE_EQ(blacklist.BannedUntil(peer), kNow + 45);
}

TEST(BlacklistTest, BanIsCapped) {
  Blacklist blacklist(5, 10, 60);
  net::PeerId peer(net::PeerId::Bytes{2});
  DhtTime t = kNow;
  for (int i = 0; i < 6; ++i) {
    blacklist.RecordFailure(peer, t);
    t = blacklist.BannedUntil(peer);
  }
  blacklist.RecordFailure(peer, t);
  EXPECT_DOUBLE_EQ(blacklist.BannedUntil(peer) - t, 60);
}

}  // namespace
}  // namespace hivemind::dht
