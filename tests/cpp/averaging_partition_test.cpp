// Group validation, load balancing and partitioning: everyone must compute the same split. Load
// balancing (averaging/load_balance.h) is checked against DeDLOC's worked cases, the closed form
// for groups of normal members, and a brute-force search over splits.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <numeric>
#include <random>

#include "averaging/group.h"
#include "averaging/load_balance.h"
#include "averaging/partition.h"
#include "net/identity.h"

namespace hivemind::averaging {
namespace {

Group MakeGroup(const std::vector<MemberMode>& modes, const std::vector<double>& bandwidths) {
  Group group;
  group.id = "group-1";
  group.my_index = 0;
  for (size_t i = 0; i < modes.size(); ++i) {
    GroupMember member;
    member.address.peer_id = net::Identity::Generate().peer_id();
    member.mode = modes[i];
    member.bandwidth = bandwidths[i];
    group.members.push_back(member);
  }
  return group;
}

TEST(SplitProportionally, SumsToTotalAndFollowsWeights) {
  auto sizes = SplitProportionally(1000, {1, 1, 2});
  EXPECT_EQ(sizes, (std::vector<size_t>{250, 250, 500}));
  sizes = SplitProportionally(10, {1, 1, 1});
  EXPECT_EQ(sizes, (std::vector<size_t>{4, 3, 3}));  // the leftover goes to the lowest index
  sizes = SplitProportionally(7, {0, 3, 0, 1});
  EXPECT_EQ(sizes, (std::vector<size_t>{0, 5, 0, 2}));
  EXPECT_EQ(SplitProportionally(0, {1, 2}), (std::vector<size_t>{0, 0}));
  EXPECT_EQ(SplitProportionally(1, {1, 1, 1}), (std::vector<size_t>{1, 0, 0}));
  EXPECT_EQ(SplitProportionally(5, {0, 0}), (std::vector<size_t>{0, 0}));
}

TEST(SplitProportionally, ExactForManyRandomInputs) {
  uint64_t state = 12345;
  auto next = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 33;
  };
  for (int trial = 0; trial < 500; ++trial) {
    size_t n = 1 + next() % 9;
    std::vector<double> weights(n);
    for (auto& w : weights) w = static_cast<double>(next() % 1000) / 7.0;
    weights[next() % n] += 1.0;  // at least one positive weight
    size_t total = next() % 100000;
    auto sizes = SplitProportionally(total, weights);
    double sum = std::accumulate(weights.begin(), weights.end(), 0.0);
    EXPECT_EQ(std::accumulate(sizes.begin(), sizes.end(), size_t{0}), total);
    for (size_t i = 0; i < n; ++i) {
      double quota = total * weights[i] / sum;
      EXPECT_LE(std::abs(static_cast<double>(sizes[i]) - quota), 1.0) << trial;
      if (weights[i] == 0) {
        EXPECT_EQ(sizes[i], 0u);
      }
    }
  }
}

TEST(Partition, SharesByModeAndBandwidthCutIntoParts) {
  Group group = MakeGroup(
      {MemberMode::kNormal, MemberMode::kClient, MemberMode::kAuxiliary, MemberMode::kNormal},
      {1.0, 5.0, 2.0, 1.0});
  auto partition = Partition::Make(group, 1000, 64);
  ASSERT_TRUE(partition.ok()) << partition.status().ToString();
  // Balanced (load_balance.h): the auxiliary member sends nothing of its own, so it takes the
  // most; each member then moves 1.125 units per unit of bandwidth.
  EXPECT_EQ(partition->share_size(0), 125u);
  EXPECT_EQ(partition->share_size(1), 0u);  // a client reduces nothing whatever its bandwidth
  EXPECT_EQ(partition->share_size(2), 750u);
  EXPECT_EQ(partition->share_size(3), 125u);
  size_t covered = 0;
  for (const Part& part : partition->parts()) {
    EXPECT_EQ(part.begin, covered);  // contiguous, in order
    EXPECT_GE(part.size, 1u);
    EXPECT_LE(part.size, 64u);
    EXPECT_GE(part.begin, partition->share_begin(part.share));
    EXPECT_LE(part.begin + part.size,
              partition->share_begin(part.share) + partition->share_size(part.share));
    covered += part.size;
  }
  EXPECT_EQ(covered, 1000u);
  EXPECT_EQ(partition->num_parts(0), 2u);  // 125 = 64 + 61
  EXPECT_EQ(partition->num_parts(1), 0u);
  EXPECT_EQ(partition->parts()[partition->first_part(3)].begin, 875u);
}

TEST(Partition, EmptyAndTinyVectors) {
  Group group =
      MakeGroup({MemberMode::kNormal, MemberMode::kNormal, MemberMode::kNormal}, {1, 1, 1});
  auto empty = Partition::Make(group, 0, 8);
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->parts().empty());
  auto one = Partition::Make(group, 1, 8);
  ASSERT_TRUE(one.ok());
  ASSERT_EQ(one->parts().size(), 1u);
  EXPECT_EQ(one->parts()[0].share, 0);
  EXPECT_FALSE(Partition::Make(group, 10, 0).ok());
}

TEST(Group, ValidationNamesTheProblem) {
  Group clients = MakeGroup({MemberMode::kClient, MemberMode::kClient}, {1, 1});
  Status status = clients.Validate();
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("without reducers"), std::string::npos);

  Group group = MakeGroup({MemberMode::kNormal, MemberMode::kNormal}, {1, 1});
  EXPECT_TRUE(group.Validate().ok());
  Group bad_index = group;
  bad_index.my_index = 2;
  EXPECT_FALSE(bad_index.Validate().ok());
  Group bad_bandwidth = group;
  bad_bandwidth.members[1].bandwidth = -0.5;  // below 0 and not kUndeclaredBandwidth
  EXPECT_FALSE(bad_bandwidth.Validate().ok());
  Group duplicate = group;
  duplicate.members[1].address.peer_id = duplicate.members[0].address.peer_id;
  EXPECT_NE(duplicate.Validate().message().find("twice"), std::string::npos);
  Group no_id = group;
  no_id.id.clear();
  EXPECT_FALSE(no_id.Validate().ok());
}

TEST(Group, DigestIgnoresMyIndexButNotMembers) {
  Group group = MakeGroup({MemberMode::kNormal, MemberMode::kAuxiliary}, {1, 2});
  Group other = group;
  other.my_index = 1;
  EXPECT_EQ(group.Digest(), other.Digest());
  EXPECT_EQ(group.Digest().size(), 32u);
  other.members[1].bandwidth = 3;
  EXPECT_NE(group.Digest(), other.Digest());
  other = group;
  other.members[1].mode = MemberMode::kNormal;
  EXPECT_NE(group.Digest(), other.Digest());
  other = group;
  other.id = "group-2";
  EXPECT_NE(group.Digest(), other.Digest());
  EXPECT_EQ(group.ReducerOrder(), (std::vector<int>{0, 1}));
}

Group Normal(const std::vector<double>& bandwidths) {
  return MakeGroup(std::vector<MemberMode>(bandwidths.size(), MemberMode::kNormal), bandwidths);
}

std::vector<size_t> Shares(const Group& group, size_t total) {
  return SplitProportionally(total, BalancedShareFractions(group));
}

// DeDLOC's cases (docs/papers reference B7): two fast and two slow peers, the fast ones reduce
// everything and the round takes S / 50 instead of S / 50 * 1.5 with equal shares; one very fast
// peer acts as a parameter server.
TEST(LoadBalance, FastPeersTakeTheSharesOfSlowOnes) {
  const size_t total = 1000000;
  Group mixed = Normal({100, 100, 50, 50});
  EXPECT_EQ(Shares(mixed, total), (std::vector<size_t>{500000, 500000, 0, 0}));
  EXPECT_NEAR(ModelRoundTime(mixed, Shares(mixed, total), total), 1.0 / 50, 1e-12);
  const std::vector<size_t> equal(4, total / 4);
  EXPECT_NEAR(ModelRoundTime(mixed, equal, total), 1.5 / 50, 1e-12);

  Group server = Normal({1000, 100, 100, 100});
  EXPECT_EQ(Shares(server, total), (std::vector<size_t>{total, 0, 0, 0}));
  EXPECT_NEAR(ModelRoundTime(server, Shares(server, total), total), 1.0 / 100, 1e-12);
}

TEST(LoadBalance, EqualBandwidthsGiveEqualShares) {
  for (size_t n : {1, 2, 3, 5, 8}) {
    auto shares = Shares(Normal(std::vector<double>(n, 7.5)), 1003);
    EXPECT_LE(*std::max_element(shares.begin(), shares.end()),
              *std::min_element(shares.begin(), shares.end()) + 1)
        << n;
  }
}

// For normal members only, the optimum is max(1 / b_min, 2 (n - 1) / sum b) (bytes per unit of
// the vector); the balancer must reach it for any bandwidths.
TEST(LoadBalance, NormalMembersReachTheClosedFormOptimum) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 400; ++trial) {
    const size_t n = 3 + rng() % 14;
    std::vector<double> bandwidths(n);
    for (auto& b : bandwidths) b = 1.0 + rng() % 1000;
    Group group = Normal(bandwidths);
    auto fractions = BalancedShareFractions(group);
    EXPECT_NEAR(std::accumulate(fractions.begin(), fractions.end(), 0.0), 1.0, 1e-12);
    const double b_min = *std::min_element(bandwidths.begin(), bandwidths.end());
    const double sum = std::accumulate(bandwidths.begin(), bandwidths.end(), 0.0);
    const double optimum = std::max(1.0 / b_min, 2.0 * (n - 1) / sum);
    const size_t total = size_t{1} << 30;  // rounding to whole elements is then negligible
    EXPECT_NEAR(ModelRoundTime(group, Shares(group, total), total), optimum, 1e-6 * optimum)
        << "trial " << trial;
  }
}

// With clients and auxiliary members no closed form is at hand: no split of a coarse grid may
// beat the balancer, and it never does worse than shares proportional to bandwidth (the rule it
// replaced).
TEST(LoadBalance, NoSplitBeatsTheBalancerWithClientsAndAuxiliaries) {
  std::mt19937 rng(9);
  const size_t total = 24;  // every split of 24 elements among the reducers is tried
  for (int trial = 0; trial < 300; ++trial) {
    const size_t n = 3 + rng() % 3;
    std::vector<MemberMode> modes(n, MemberMode::kNormal);
    std::vector<double> bandwidths(n);
    for (size_t i = 0; i < n; ++i) {
      bandwidths[i] = 1.0 + rng() % 20;
      const unsigned roll = rng() % 4;
      if (roll == 0) modes[i] = MemberMode::kClient;
      if (roll == 1) modes[i] = MemberMode::kAuxiliary;
    }
    modes[0] = MemberMode::kNormal;  // someone reduces and someone contributes
    Group group = MakeGroup(modes, bandwidths);
    const auto balanced = BalancedShareFractions(group);
    const double fine_total = 1e9;
    std::vector<size_t> fine(n);
    for (size_t i = 0; i < n; ++i) fine[i] = static_cast<size_t>(balanced[i] * fine_total);
    fine[0] += static_cast<size_t>(fine_total) - std::accumulate(fine.begin(), fine.end(), 0ul);
    const double best = ModelRoundTime(group, fine, static_cast<size_t>(fine_total));

    std::vector<double> proportional(n, 0.0);
    for (size_t i = 0; i < n; ++i) {
      if (group.members[i].can_reduce()) proportional[i] = bandwidths[i];
    }
    EXPECT_LE(best, ModelRoundTime(group, SplitProportionally(total, proportional), total) + 1e-7)
        << "trial " << trial;

    // Every composition of `total` among the members that can reduce.
    std::vector<size_t> split(n, 0);
    std::function<void(size_t, size_t)> visit = [&](size_t i, size_t left) {
      if (i + 1 == n) {
        if (left > 0 && !group.members[i].can_reduce()) return;
        split[i] = left;
        EXPECT_LE(best, ModelRoundTime(group, split, total) + 1e-7) << "trial " << trial;
        return;
      }
      const size_t most = group.members[i].can_reduce() ? left : 0;
      for (size_t s = 0; s <= most; ++s) {
        split[i] = s;
        visit(i + 1, left - s);
      }
    };
    visit(0, total);
  }
}

TEST(LoadBalance, MembersThatCannotReduceGetNothing) {
  Group group = MakeGroup({MemberMode::kNormal, MemberMode::kClient, MemberMode::kNormal,
                           MemberMode::kNormal, MemberMode::kAuxiliary},
                          {1, 50, 0, 2, 3});
  auto fractions = BalancedShareFractions(group);
  EXPECT_EQ(fractions[1], 0.0);           // a client, however fast
  EXPECT_EQ(fractions[2], 0.0);           // bandwidth 0: never reduces
  EXPECT_GT(fractions[4], fractions[3]);  // an auxiliary peer sends nothing of its own
  EXPECT_NEAR(std::accumulate(fractions.begin(), fractions.end(), 0.0), 1.0, 1e-12);
}

// hivemind's `bandwidth=None`: a member that declares nothing is assumed to have the mean of the
// declared bandwidths, so it is neither starved (as a default of 1 beside peers declaring 100
// would) nor overloaded.
TEST(LoadBalance, AnUndeclaredBandwidthCountsAsTheMeanOfTheDeclaredOnes) {
  Group mixed = Normal({100, kUndeclaredBandwidth, 50, 50, 100});
  Group resolved = Normal({100, 75, 50, 50, 100});
  EXPECT_EQ(BalancedShareFractions(mixed), BalancedShareFractions(resolved));
  EXPECT_GT(BalancedShareFractions(mixed)[1], 0.0);
  Group nobody = Normal({kUndeclaredBandwidth, kUndeclaredBandwidth, kUndeclaredBandwidth});
  auto shares = Shares(nobody, 999);
  EXPECT_EQ(shares, (std::vector<size_t>{333, 333, 333}));
  EXPECT_TRUE(nobody.Validate().ok());
  Group negative = Normal({1, -2});
  EXPECT_FALSE(negative.Validate().ok());  // only the sentinel is allowed below 0
}

TEST(LoadBalance, PartitionsOfDifferentSplitsHaveDifferentDigests) {
  Group group = Normal({100, 100, 50, 50});
  auto a = Partition::Make(group, 1000, 64);
  auto b = Partition::Make(group, 1000, 64);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->Digest(), b->Digest());
  group.members[2].bandwidth = 200;
  auto c = Partition::Make(group, 1000, 64);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->Digest(), c->Digest());
  auto d = Partition::Make(Normal({100, 100, 50, 50}), 1000, 32);
  ASSERT_TRUE(d.ok());
  EXPECT_NE(a->Digest(), d->Digest());
}

}  // namespace
}  // namespace hivemind::averaging
