// Group validation, load balancing and partitioning: everyone must compute the same split.
#include <gtest/gtest.h>

#include <numeric>

#include "averaging/group.h"
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
  bad_bandwidth.members[1].bandwidth = -1;
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

}  // namespace
}  // namespace hivemind::averaging
