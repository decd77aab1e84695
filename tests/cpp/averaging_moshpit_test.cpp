// Moshpit averaging on real peers: DHT matchmaking under grid keys, then the butterfly all-reduce,
// round after round, all on 127.0.0.1 in one process. N = M^d peers in groups of M must hold the
// exact global mean after d rounds (tests/cpp/averaging_group_key_test.cpp checks the same
// arithmetic on 256 simulated peers; this checks the real protocol gets there).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "averaging/allreduce.h"
#include "averaging/group_key.h"
#include "averaging/matchmaking.h"
#include "dht/dht_runner.h"
#include "test_util.h"

namespace hivemind::averaging {
namespace {

using std::chrono::milliseconds;

struct MoshpitPeer {
  std::unique_ptr<dht::DhtRunner> runner;
  std::unique_ptr<Matchmaker> matchmaker;
  std::unique_ptr<AllReduceService> allreduce;
  std::unique_ptr<GroupKeyManager> keys;
  std::vector<float> values;
};

class MoshpitTest : public ::testing::Test {
 protected:
  void StartPeers(int side, int dims) {
    const int count = static_cast<int>(std::pow(side, dims));
    for (int i = 0; i < count; ++i) {
      dht::DhtRunnerOptions options;
      options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};
      if (i > 0) options.initial_peers = peers_[0].runner->visible_addresses();
      options.call_timeout = milliseconds(2000);
      options.bootstrap_timeout = milliseconds(20000);
      auto runner = dht::DhtRunner::Start(options);
      ASSERT_TRUE(runner.ok()) << runner.status().ToString();
      MoshpitPeer peer;
      peer.runner = std::move(runner).value();
      peer.matchmaker = std::make_unique<Matchmaker>(*peer.runner);
      peer.allreduce = std::make_unique<AllReduceService>(peer.runner->node());
      GroupKeyOptions keys;
      keys.prefix = "moshpit_real";
      keys.grid_side = side;
      keys.grid_dims = dims;
      keys.rank = i;
      auto manager = GroupKeyManager::Create(keys);
      ASSERT_TRUE(manager.ok()) << manager.status().ToString();
      peer.keys = std::make_unique<GroupKeyManager>(std::move(manager).value());
      // A different vector per peer, with values whose mean is exact in float32.
      peer.values = {static_cast<float>(i), static_cast<float>(3 * i % 7), 1.0f};
      peers_.push_back(std::move(peer));
    }
  }

  // One Moshpit round: every peer matchmakes under its key (groups of exactly `side`), averages
  // with its group, and moves its key. Returns the sizes of the groups each peer was in.
  std::vector<size_t> Round(int side) {
    std::vector<size_t> sizes(peers_.size(), 0);
    std::vector<std::string> errors(peers_.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < peers_.size(); ++i) {
      threads.emplace_back([&, i] {
        MoshpitPeer& peer = peers_[i];
        MatchmakingOptions options;
        options.group_key = peer.keys->CurrentKey();
        options.schema_hash = "three-floats";
        options.target_group_size = side;
        options.min_group_size = side;
        // 64 peers' threads share 2 cores here, several times slower under the sanitizers: a
        // leader that waited too little for a follower's confirmation would seal without it.
        options.window = milliseconds(2000) * test::kSlowdown;
        options.timeout = milliseconds(30000) * test::kSlowdown;
        options.request_timeout = milliseconds(2000) * test::kSlowdown;
        auto formed = peer.matchmaker->FormGroup(options);
        if (!formed.ok()) {
          errors[i] = "matchmaking: " + formed.status().ToString();
          return;
        }
        AllReduceOptions round;
        round.timeout = milliseconds(30000) * test::kSlowdown;
        auto averaged = peer.allreduce->AllReduce(formed->group, peer.values, 1.0f, round);
        if (!averaged.ok()) {
          errors[i] = "all-reduce: " + averaged.status().ToString();
          return;
        }
        Status moved = peer.keys->OnGroupAssembled(formed->group.id, formed->group.my_index,
                                                   static_cast<int>(formed->group.members.size()));
        if (!moved.ok()) errors[i] = "key: " + moved.ToString();
        sizes[i] = formed->group.members.size();
      });
    }
    for (auto& thread : threads) thread.join();
    for (size_t i = 0; i < peers_.size(); ++i) EXPECT_EQ(errors[i], "") << "peer " << i;
    return sizes;
  }

  void TearDown() override {
    for (auto& peer : peers_) {
      peer.matchmaker.reset();
      peer.allreduce.reset();
    }
    for (auto& peer : peers_) peer.runner->Shutdown();
  }

  std::vector<MoshpitPeer> peers_;
};

void ExpectGlobalMean(const std::vector<MoshpitPeer>& peers) {
  const double n = static_cast<double>(peers.size());
  for (size_t e = 0; e < 3; ++e) {
    double sum = 0;
    for (size_t i = 0; i < peers.size(); ++i) {
      sum += e == 0 ? static_cast<double>(i) : e == 1 ? static_cast<double>(3 * i % 7) : 1.0;
    }
    for (size_t i = 0; i < peers.size(); ++i) {
      EXPECT_NEAR(peers[i].values[e], sum / n, 1e-6 * (1 + std::abs(sum / n)))
          << "peer " << i << " element " << e;
    }
  }
}

TEST_F(MoshpitTest, SixteenRealPeersInGroupsOfFourHoldTheGlobalMeanAfterTwoRounds) {
  StartPeers(4, 2);
  ASSERT_EQ(peers_.size(), 16u);
  for (int round = 0; round < 2; ++round) {
    for (size_t size : Round(4)) EXPECT_EQ(size, 4u) << "round " << round;
    if (HasFailure()) return;
  }
  ExpectGlobalMean(peers_);
}

TEST_F(MoshpitTest, SixtyFourRealPeersOnAFourCubedGridHoldTheGlobalMeanAfterThreeRounds) {
  StartPeers(4, 3);
  ASSERT_EQ(peers_.size(), 64u);
  for (int round = 0; round < 3; ++round) {
    for (size_t size : Round(4)) EXPECT_EQ(size, 4u) << "round " << round;
    if (HasFailure()) return;
  }
  ExpectGlobalMean(peers_);
}

}  // namespace
}  // namespace hivemind::averaging
