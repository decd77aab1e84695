// GroupKeyManager (averaging/group_key.h): key format, the Moshpit update rule, and a pure
// simulation of Moshpit averaging (no network): peers are grouped by the key they would declare
// under, groups are capped at the grid side like matchmaking caps them at target_group_size, each
// group replaces its members' values by their mean, and every member moves its key.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "averaging/group_key.h"

namespace hivemind::averaging {
namespace {

TEST(GroupKeyTest, KeyNamesPrefixSchemaAndCoordinates) {
  EXPECT_EQ(MakeGroupKey("run", std::string("\x01\xab", 2), {}), "run.s01ab.g");
  EXPECT_EQ(MakeGroupKey("run", "", {3, 0, 12}), "run.s.g3.0.12");
  // Only the first 16 bytes of a long hash go into the key.
  EXPECT_EQ(MakeGroupKey("r", std::string(40, '\xff'), {}), "r.s" + std::string(32, 'f') + ".g");
}

TEST(GroupKeyTest, CreateRejectsBadOptions) {
  GroupKeyOptions options;
  options.prefix = "has.dot";
  EXPECT_EQ(GroupKeyManager::Create(options).status().code(), StatusCode::kInvalidArgument);
  options.prefix = "";
  EXPECT_EQ(GroupKeyManager::Create(options).status().code(), StatusCode::kInvalidArgument);
  options.prefix = "run";
  options.grid_side = 4;
  options.grid_dims = 3;
  options.initial_coordinates = {1};  // needs two
  EXPECT_EQ(GroupKeyManager::Create(options).status().code(), StatusCode::kInvalidArgument);
  options.initial_coordinates = {1, 4};  // 4 is off the grid
  auto bad = GroupKeyManager::Create(options);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("outside [0, 4)"), std::string::npos);
  options.initial_coordinates = {1, 3};
  EXPECT_TRUE(GroupKeyManager::Create(options).ok());
}

TEST(GroupKeyTest, NextCoordinatesAreDistinctDeterministicAndSpread) {
  std::set<int> seen_for_small_groups;
  for (int g = 0; g < 200; ++g) {
    const std::string id = "group-" + std::to_string(g);
    auto full = NextCoordinates(id, 4, 4);
    EXPECT_EQ(std::set<int>(full.begin(), full.end()).size(), 4u);
    EXPECT_EQ(full, NextCoordinates(id, 4, 4));  // every member computes the same list
    auto small = NextCoordinates(id, 2, 8);
    ASSERT_EQ(small.size(), 2u);
    EXPECT_NE(small[0], small[1]);
    for (int c : small) {
      EXPECT_GE(c, 0);
      EXPECT_LT(c, 8);
      seen_for_small_groups.insert(c);
    }
  }
  // Small groups must not crowd the low coordinates.
  EXPECT_EQ(seen_for_small_groups.size(), 8u);
}

TEST(GroupKeyTest, UpdateShiftsTheWindowAndFlatGridsStay) {
  GroupKeyOptions options;
  options.prefix = "run";
  options.grid_side = 4;
  options.grid_dims = 3;
  options.initial_coordinates = {1, 2};
  auto manager = GroupKeyManager::Create(options).value();
  EXPECT_EQ(manager.CurrentKey(), "run.s.g1.2");
  ASSERT_TRUE(manager.OnGroupAssembled("gid", 3, 4).ok());
  const int next = NextCoordinates("gid", 4, 4)[3];
  EXPECT_EQ(manager.coordinates(), (std::vector<int>{2, next}));
  EXPECT_EQ(manager.OnGroupAssembled("gid", 4, 4).code(), StatusCode::kInvalidArgument);
  manager.OnGroupFailed();
  EXPECT_EQ(manager.coordinates(), (std::vector<int>{2, next}));

  GroupKeyOptions flat;
  flat.prefix = "run";
  auto flat_manager = GroupKeyManager::Create(flat).value();
  ASSERT_TRUE(flat_manager.OnGroupAssembled("gid", 0, 2).ok());
  EXPECT_EQ(flat_manager.CurrentKey(), "run.s.g");
}

// ---- Moshpit simulation ----

struct SimPeer {
  GroupKeyManager keys;
  double value;
};

struct Swarm {
  std::vector<SimPeer> peers;
  std::mt19937_64 rng{12345};
  int grid_side = 0;
  int groups_last_round = 0;

  Swarm(int n, int side, int dims, uint64_t seed) : rng(seed), grid_side(side) {
    std::normal_distribution<double> normal(0.0, 1.0);
    for (int i = 0; i < n; ++i) {
      GroupKeyOptions options;
      options.prefix = "sim";
      options.schema_hash = "schema";
      options.grid_side = side;
      options.grid_dims = dims;
      options.rank = i;
      peers.push_back({GroupKeyManager::Create(options).value(), 100.0 * normal(rng)});
    }
  }

  // One round: present peers are bucketed by key; each bucket is split into groups of at most
  // grid_side (as a leader accepts at most target_group_size); groups of 2+ average and move.
  void Round(double dropout) {
    std::bernoulli_distribution absent(dropout);
    std::map<std::string, std::vector<int>> buckets;
    for (int i = 0; i < static_cast<int>(peers.size()); ++i) {
      if (!absent(rng)) buckets[peers[i].keys.CurrentKey()].push_back(i);
    }
    groups_last_round = 0;
    for (auto& [key, members] : buckets) {
      std::shuffle(members.begin(), members.end(), rng);  // who reaches which leader first
      for (size_t begin = 0; begin < members.size(); begin += grid_side) {
        std::vector<int> group(members.begin() + begin,
                               members.begin() + std::min(members.size(), begin + grid_side));
        if (group.size() < 2) continue;  // min_group_size: a lone peer keeps value and key
        ++groups_last_round;
        double sum = 0;
        for (int i : group) sum += peers[i].value;
        const double mean = sum / static_cast<double>(group.size());
        const std::string group_id = std::to_string(rng());
        for (size_t index = 0; index < group.size(); ++index) {
          peers[group[index]].value = mean;
          ASSERT_TRUE(peers[group[index]]
                          .keys
                          .OnGroupAssembled(group_id, static_cast<int>(index),
                                            static_cast<int>(group.size()))
                          .ok());
        }
      }
    }
  }

  double Mean() const {
    double sum = 0;
    for (const auto& p : peers) sum += p.value;
    return sum / static_cast<double>(peers.size());
  }
  double MaxAbsError(double target) const {
    double worst = 0;
    for (const auto& p : peers) worst = std::max(worst, std::abs(p.value - target));
    return worst;
  }
  double RmsError(double target) const {
    double sum = 0;
    for (const auto& p : peers) sum += (p.value - target) * (p.value - target);
    return std::sqrt(sum / static_cast<double>(peers.size()));
  }
};

void ExpectExactAfter(int n, int side, int dims) {
  Swarm swarm(n, side, dims, 7);
  const double mean = swarm.Mean();
  const double scale = swarm.MaxAbsError(mean);
  for (int round = 1; round <= dims; ++round) {
    swarm.Round(0.0);
    EXPECT_EQ(swarm.groups_last_round, n / side) << "round " << round;
    const double error = swarm.MaxAbsError(mean);
    if (round < dims) {
      EXPECT_GT(error, 1e-3 * scale) << "exact too early: round " << round;
    } else {
      EXPECT_LT(error, 1e-6 * scale) << n << " peers, grid " << side << "^" << dims;
    }
  }
}

TEST(MoshpitSimulationTest, SixteenPeersInGroupsOfFourAreExactAfterTwoRounds) {
  ExpectExactAfter(16, 4, 2);
}

TEST(MoshpitSimulationTest, SixtyFourPeersOnAFourCubedGridAreExactAfterThreeRounds) {
  ExpectExactAfter(64, 4, 3);
}

TEST(MoshpitSimulationTest, TwoHundredFiftySixPeersOnASixteenSquaredGridAreExactAfterTwoRounds) {
  ExpectExactAfter(256, 16, 2);
}

// Dropouts and partial grids: averaging inside groups never changes the sum, so the mean of all
// peers (absent ones keep their values) is kept exactly, and the spread keeps shrinking.
void ExpectErrorFallsEveryRound(int n, int side, int dims, double dropout, int rounds) {
  Swarm swarm(n, side, dims, 99);
  const double mean = swarm.Mean();
  const double scale = swarm.MaxAbsError(mean);
  double previous = swarm.RmsError(mean);
  for (int round = 1; round <= rounds; ++round) {
    swarm.Round(dropout);
    EXPECT_NEAR(swarm.Mean(), mean, 1e-12 * scale) << "round " << round;
    const double error = swarm.RmsError(mean);
    EXPECT_LT(error, previous) << "round " << round << " of " << n << " peers";
    std::printf("  n=%d grid=%d^%d dropout=%.0f%% round %d: rms error %.3g of scale %.3g\n", n,
                side, dims, dropout * 100, round, error, scale);
    previous = error;
  }
}

TEST(MoshpitSimulationTest, TenPercentDropoutStillShrinksTheErrorEveryRound16) {
  ExpectErrorFallsEveryRound(16, 4, 2, 0.1, 5);
}

TEST(MoshpitSimulationTest, TenPercentDropoutStillShrinksTheErrorEveryRound64) {
  ExpectErrorFallsEveryRound(64, 4, 3, 0.1, 6);
}

TEST(MoshpitSimulationTest, PartialGridKeepsTheMeanAndConverges) {
  ExpectErrorFallsEveryRound(12, 4, 2, 0.0, 4);
  ExpectErrorFallsEveryRound(50, 4, 3, 0.0, 5);
}

}  // namespace
}  // namespace hivemind::averaging
