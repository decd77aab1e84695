// Matchmaker (averaging/matchmaking.h) over real DhtRunners on 127.0.0.1, several in one process:
// groups of 2, 4 and 8, a target size that splits a swarm, schema separation, a group too small, a
// leader that dies mid-search, the metadata all-gather, and Moshpit keys driving real rounds.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <future>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "averaging/group_key.h"
#include "averaging/matchmaking.h"
#include "averaging/matchmaking_sim_world.h"
#include "dht/dht_runner.h"
#include "test_util.h"

namespace hivemind::averaging {
namespace {

using std::chrono::milliseconds;
using SteadyClock = std::chrono::steady_clock;

dht::DhtRunnerOptions LocalOptions(std::vector<std::string> initial_peers = {}) {
  dht::DhtRunnerOptions options;
  options.initial_peers = std::move(initial_peers);
  options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};
  options.call_timeout = milliseconds(1000);
  options.bootstrap_timeout = milliseconds(10000);
  options.maintenance_period = milliseconds(100);
  return options;
}

class MatchmakingTest : public ::testing::Test {
 protected:
  void StartSwarm(size_t size) {
    for (size_t i = 0; i < size; ++i) {
      auto runner = dht::DhtRunner::Start(
          LocalOptions(i == 0 ? std::vector<std::string>{} : runners_[0]->visible_addresses()));
      ASSERT_TRUE(runner.ok()) << runner.status().ToString();
      runners_.push_back(std::move(runner).value());
      matchmakers_.push_back(std::make_unique<Matchmaker>(*runners_.back()));
    }
  }

  MatchmakingOptions Options(const std::string& key, int target) {
    MatchmakingOptions options;
    options.group_key = key;
    options.schema_hash = "schema-1";
    options.target_group_size = target;
    options.min_group_size = 2;
    options.window = milliseconds(500);
    options.timeout = milliseconds(5000);
    return options;
  }

  // Runs FormGroup on peers [0, options.size()) at once, each on its own thread.
  std::vector<Result<FormedGroup>> FormAll(const std::vector<MatchmakingOptions>& options,
                                           size_t first_peer = 0) {
    std::vector<std::optional<Result<FormedGroup>>> slots(options.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < options.size(); ++i) {
      threads.emplace_back(
          [&, i] { slots[i] = matchmakers_[first_peer + i]->FormGroup(options[i]); });
    }
    for (auto& t : threads) t.join();
    std::vector<Result<FormedGroup>> results;
    for (auto& slot : slots) results.push_back(std::move(*slot));
    return results;
  }

  void TearDown() override {
    matchmakers_.clear();
    for (auto& r : runners_) r->Shutdown();
  }

  std::vector<std::unique_ptr<dht::DhtRunner>> runners_;
  std::vector<std::unique_ptr<Matchmaker>> matchmakers_;
};

// Everyone in one group: identical digests, distinct indices, and every member's metadata.
void ExpectOneGroup(const std::vector<Result<FormedGroup>>& results,
                    const std::vector<std::string>& peer_ids) {
  ASSERT_FALSE(results.empty());
  for (const auto& r : results) ASSERT_TRUE(r.ok()) << r.status().ToString();
  const std::string digest = results[0]->group.Digest();
  std::set<int> indices;
  int leaders = 0;
  double slowest = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& formed = results[i].value();
    EXPECT_EQ(formed.group.Digest(), digest);
    EXPECT_EQ(formed.group.members.size(), results.size());
    EXPECT_EQ(formed.group.members[formed.group.my_index].address.peer_id.ToString(), peer_ids[i]);
    EXPECT_TRUE(formed.unconfirmed_members.empty());
    indices.insert(formed.group.my_index);
    leaders += formed.led ? 1 : 0;
    slowest = std::max(slowest, formed.seconds);
    // The all-gather: member j's metadata is "meta-" + its peer id, wherever j landed.
    ASSERT_EQ(formed.metadata.size(), formed.group.members.size());
    for (size_t j = 0; j < formed.metadata.size(); ++j) {
      EXPECT_EQ(formed.metadata[j], "meta-" + formed.group.members[j].address.peer_id.ToString());
    }
  }
  EXPECT_EQ(indices.size(), results.size());
  EXPECT_EQ(leaders, 1);
  std::printf("  %zu peers formed one group in %.1f ms (slowest member)\n", results.size(),
              slowest * 1000);
}

TEST_F(MatchmakingTest, TwoFourAndEightPeersFormOneGroupQuickly) {
  StartSwarm(8);
  for (size_t n : {2, 4, 8}) {
    std::vector<MatchmakingOptions> options;
    std::vector<std::string> ids;
    for (size_t i = 0; i < n; ++i) {
      options.push_back(Options("run.flat" + std::to_string(n), static_cast<int>(n)));
      options.back().metadata = "meta-" + runners_[i]->peer_id();
      ids.push_back(runners_[i]->peer_id());
    }
    ExpectOneGroup(FormAll(options), ids);
  }
  // Consecutive rounds under the same key work too (old declarations were retracted).
  std::vector<MatchmakingOptions> options;
  std::vector<std::string> ids;
  for (size_t i = 0; i < 4; ++i) {
    options.push_back(Options("run.flat4", 4));
    options.back().metadata = "meta-" + runners_[i]->peer_id();
    ids.push_back(runners_[i]->peer_id());
  }
  ExpectOneGroup(FormAll(options), ids);
}

TEST_F(MatchmakingTest, WithoutATargetTheWindowSealsTheGroup) {
  StartSwarm(3);
  std::vector<MatchmakingOptions> options;
  std::vector<std::string> ids;
  for (size_t i = 0; i < 3; ++i) {
    options.push_back(Options("run.window", 0));
    options.back().window = milliseconds(300);
    options.back().metadata = "meta-" + runners_[i]->peer_id();
    ids.push_back(runners_[i]->peer_id());
  }
  auto results = FormAll(options);
  ExpectOneGroup(results, ids);
  for (const auto& r : results) EXPECT_GE(r->seconds, 0.25);
}

TEST_F(MatchmakingTest, EightPeersWithTargetFourMakeTwoGroupsOfFour) {
  StartSwarm(8);
  std::vector<MatchmakingOptions> options(8, Options("run.split", 4));
  for (size_t i = 0; i < 8; ++i) options[i].metadata = "meta-" + runners_[i]->peer_id();
  auto results = FormAll(options);
  std::map<std::string, std::vector<const FormedGroup*>> groups;
  for (const auto& r : results) {
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    groups[r->group.id].push_back(&r.value());
  }
  ASSERT_EQ(groups.size(), 2u);
  for (const auto& [id, members] : groups) {
    ASSERT_EQ(members.size(), 4u);
    std::set<int> indices;
    for (const auto* m : members) {
      EXPECT_EQ(m->group.Digest(), members[0]->group.Digest());
      EXPECT_EQ(m->group.members.size(), 4u);
      indices.insert(m->group.my_index);
    }
    EXPECT_EQ(indices.size(), 4u);
  }
}

TEST_F(MatchmakingTest, DifferentSchemasNeverShareAGroup) {
  StartSwarm(6);
  // Under one key on purpose: the leader's check must keep them apart, not only the key.
  std::vector<MatchmakingOptions> options(6, Options("run.schemas", 0));
  for (size_t i = 0; i < 6; ++i) {
    options[i].schema_hash = i % 2 == 0 ? "schema-A" : "schema-B";
    options[i].window = milliseconds(400);
    options[i].metadata = "meta-" + runners_[i]->peer_id();
  }
  auto results = FormAll(options);
  std::map<std::string, std::set<std::string>> schemas_by_group;
  std::map<std::string, size_t> sizes;
  for (size_t i = 0; i < 6; ++i) {
    ASSERT_TRUE(results[i].ok()) << results[i].status().ToString();
    schemas_by_group[results[i]->group.id].insert(options[i].schema_hash);
    ++sizes[results[i]->group.id];
  }
  EXPECT_EQ(schemas_by_group.size(), 2u);
  for (const auto& [id, schemas] : schemas_by_group) EXPECT_EQ(schemas.size(), 1u);
  for (const auto& [id, size] : sizes) EXPECT_EQ(size, 3u);
  // And the keys a GroupKeyManager builds differ anyway.
  EXPECT_NE(MakeGroupKey("run", "schema-A", {}), MakeGroupKey("run", "schema-B", {}));
}

TEST_F(MatchmakingTest, TooFewPeersFailsWithAClearErrorWithinTheTimeout) {
  StartSwarm(2);
  auto options = Options("run.alone", 0);
  options.window = milliseconds(200);
  options.timeout = milliseconds(1000);
  const auto start = SteadyClock::now();
  auto result = matchmakers_[0]->FormGroup(options);
  const double seconds = std::chrono::duration<double>(SteadyClock::now() - start).count();
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kDeadlineExceeded);
  const std::string& message = result.status().message();
  EXPECT_NE(message.find("run.alone"), std::string::npos) << message;
  EXPECT_NE(message.find("1 peer(s) declared"), std::string::npos) << message;
  EXPECT_NE(message.find("min_group_size is 2"), std::string::npos) << message;
  EXPECT_LT(seconds, 2.0);
  std::printf("  error after %.0f ms: %s\n", seconds * 1000, message.c_str());

  // min_group_size 3 with two peers: both fail, both say why.
  std::vector<MatchmakingOptions> two(2, options);
  for (auto& o : two) o.min_group_size = 3;
  for (const auto& r : FormAll(two)) {
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("min_group_size is 3"), std::string::npos)
        << r.status().message();
  }
}

// One search of a shared matchmaker ends at once when its flag is set, and one that starts with
// the flag set fails before declaring; the other searches are untouched.
TEST_F(MatchmakingTest, ACancelledSearchEndsAtOnceAndOnlyItself) {
  StartSwarm(3);
  auto cancelled = std::make_shared<std::atomic<bool>>(false);
  auto lonely = Options("run.lonely", 0);
  lonely.timeout = milliseconds(20000);
  lonely.cancelled = cancelled;
  const auto start = SteadyClock::now();
  auto search = std::async(std::launch::async, [&] { return matchmakers_[0]->FormGroup(lonely); });
  // The pair below forms while the lonely search waits; then the lonely one is cancelled.
  std::vector<MatchmakingOptions> pair(2, Options("run.pair", 2));
  auto formed = FormAll(pair, 1);
  for (const auto& r : formed) ASSERT_TRUE(r.ok()) << r.status().ToString();
  cancelled->store(true);
  matchmakers_[0]->WakeSearches();
  auto result = search.get();
  EXPECT_EQ(result.status().code(), StatusCode::kCancelled);
  EXPECT_NE(result.status().message().find("cancelled"), std::string::npos);
  EXPECT_LT(std::chrono::duration<double>(SteadyClock::now() - start).count(), 10.0);
  // Already cancelled: refused before anything is declared.
  EXPECT_EQ(matchmakers_[0]->FormGroup(lonely).status().code(), StatusCode::kCancelled);
}

TEST_F(MatchmakingTest, BadOptionsAreRejected) {
  StartSwarm(1);
  auto options = Options("", 0);
  EXPECT_EQ(matchmakers_[0]->FormGroup(options).status().code(), StatusCode::kInvalidArgument);
  options = Options("run.bad", 2);
  options.min_group_size = 3;
  EXPECT_EQ(matchmakers_[0]->FormGroup(options).status().code(), StatusCode::kInvalidArgument);
  options = Options("run.bad", 2);
  options.metadata = std::string(options.max_metadata_bytes + 1, 'x');
  EXPECT_EQ(matchmakers_[0]->FormGroup(options).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(MatchmakingTest, LeaderShutDownMidSearchLeavesTheOthersAGroupOrAClearError) {
  StartSwarm(5);
  // Peer 1 declares first, so it leads; the target is never reached, so it waits for its window.
  auto options = Options("run.leaderdies", 10);
  // Scaled under the sanitizers: a follower learns that its leader died only from timeouts.
  options.window = milliseconds(800) * test::kSlowdown;
  options.request_timeout = milliseconds(300) * test::kSlowdown;
  options.timeout = milliseconds(6000) * test::kSlowdown;
  std::optional<Result<FormedGroup>> leader_result;
  std::thread leader([&] { leader_result = matchmakers_[1]->FormGroup(options); });
  // Waits (bounded, polling) until `count` declarations are in the DHT.
  auto wait_for_declarations = [&](size_t count) {
    const auto deadline = SteadyClock::now() + milliseconds(3000) * test::kSlowdown;
    while (SteadyClock::now() < deadline) {
      auto got = runners_[0]->Get("run.leaderdies", true);
      if (got.ok() && got.value() && got.value()->dictionary.size() >= count) return;
      std::this_thread::sleep_for(milliseconds(5));
    }
  };
  wait_for_declarations(1);
  std::vector<std::optional<Result<FormedGroup>>> others(3);
  std::vector<std::thread> threads;
  const auto start = SteadyClock::now();
  for (size_t i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] { others[i] = matchmakers_[2 + i]->FormGroup(options); });
  }
  // Once every follower has declared (and so is asking the leader), kill the leader: its node
  // goes away without a word.
  wait_for_declarations(4);
  runners_[1]->Shutdown();
  for (auto& t : threads) t.join();
  leader.join();
  const double seconds = std::chrono::duration<double>(SteadyClock::now() - start).count();
  EXPECT_LT(seconds, 6.5 * test::kSlowdown);
  // The dead leader's own call ends too (its DHT is gone), with an error.
  ASSERT_TRUE(leader_result.has_value());
  EXPECT_FALSE(leader_result->ok());
  std::printf("  dead leader's own call: %s\n", leader_result->status().ToString().c_str());
  // Usually all three regroup together. Under the sanitizers the orphans sometimes give up on
  // the dead leader at different moments, two seal a pair and the third is left alone: the
  // contract is a group without the dead leader, or a clear error naming what went wrong.
  std::string digest;
  size_t grouped = 0;
  for (auto& r : others) {
    ASSERT_TRUE(r.has_value());
    if (!r->ok()) {
      EXPECT_EQ(r->status().code(), StatusCode::kDeadlineExceeded) << r->status().ToString();
      EXPECT_NE(r->status().message().find("run.leaderdies"), std::string::npos);
      continue;
    }
    ++grouped;
    if (digest.empty()) digest = (*r)->group.Digest();
    EXPECT_EQ((*r)->group.Digest(), digest) << "the survivors must form one group";
    for (const auto& m : (*r)->group.members) {
      EXPECT_NE(m.address.peer_id.ToString(), runners_[1]->peer_id());
    }
  }
  EXPECT_GE(grouped, 2u);
  std::printf("  survivors regrouped %.0f ms after the search began\n", seconds * 1000);
}

TEST_F(MatchmakingTest, MoshpitKeysMixPairsAcrossRounds) {
  // 4 peers on a 2x2 grid: round 1 pairs peers that share a coordinate, round 2 must pair each
  // with someone it has not met, so after two rounds everyone holds the global mean.
  StartSwarm(4);
  std::vector<GroupKeyManager> keys;
  for (int i = 0; i < 4; ++i) {
    GroupKeyOptions k;
    k.prefix = "moshpit";
    k.schema_hash = "schema-1";
    k.grid_side = 2;
    k.grid_dims = 2;
    k.rank = i;
    keys.push_back(GroupKeyManager::Create(k).value());
  }
  std::vector<double> values = {1, 2, 3, 10};
  std::set<std::pair<int, int>> met_before;
  for (int round = 0; round < 2; ++round) {
    std::set<std::pair<int, int>> met_now;
    std::vector<MatchmakingOptions> options;
    for (int i = 0; i < 4; ++i) {
      options.push_back(Options(keys[i].CurrentKey(), 2));
      options.back().metadata = std::to_string(values[i]);
    }
    auto results = FormAll(options);
    std::vector<double> next(4);
    for (int i = 0; i < 4; ++i) {
      ASSERT_TRUE(results[i].ok()) << results[i].status().ToString();
      const auto& formed = results[i].value();
      ASSERT_EQ(formed.group.members.size(), 2u);
      double sum = 0;
      for (const auto& m : formed.metadata) sum += std::stod(m);  // the all-gather as averaging
      next[i] = sum / 2;
      for (int j = 0; j < 4; ++j) {
        if (j != i && formed.group.members[1 - formed.group.my_index].address.peer_id.ToString() ==
                          runners_[j]->peer_id()) {
          const std::pair<int, int> pair{std::min(i, j), std::max(i, j)};
          EXPECT_EQ(met_before.count(pair), 0u) << "peers " << i << " and " << j << " met twice";
          met_now.insert(pair);
        }
      }
      ASSERT_TRUE(keys[i]
                      .OnGroupAssembled(formed.group.id, formed.group.my_index,
                                        static_cast<int>(formed.group.members.size()))
                      .ok());
    }
    EXPECT_EQ(met_now.size(), 2u);
    met_before.insert(met_now.begin(), met_now.end());
    values = next;
  }
  for (double v : values) EXPECT_DOUBLE_EQ(v, 4.0);
}

// Another peer's env, forwarded; the tests below override what they perturb.
class ForwardingEnv : public MatchmakingEnv {
 public:
  explicit ForwardingEnv(std::shared_ptr<MatchmakingEnv> inner) : inner_(std::move(inner)) {}

  Future<dht::DhtRunnerStoreResult> StoreSubkey(const std::string& key, const std::string& subkey,
                                                std::string value,
                                                dht::DhtTime expiration) override {
    return inner_->StoreSubkey(key, subkey, std::move(value), expiration);
  }
  Future<std::optional<dht::DhtRunnerValue>> GetLatest(const std::string& key) override {
    return inner_->GetLatest(key);
  }
  dht::DhtTime Now() const override { return inner_->Now(); }
  std::string owner_marker() const override { return inner_->owner_marker(); }
  const net::PeerId& peer_id() const override { return inner_->peer_id(); }
  std::vector<std::string> visible_addresses() const override {
    return inner_->visible_addresses();
  }
  bool client_mode() const override { return inner_->client_mode(); }
  bool is_running() const override { return inner_->is_running(); }
  void RegisterUnary(const std::string& method, net::UnaryHandler handler) override {
    inner_->RegisterUnary(method, std::move(handler));
  }
  Future<net::Message> Call(const net::PeerAddress& peer, const std::string& method,
                            net::Message request, milliseconds timeout) override {
    return inner_->Call(peer, method, std::move(request), timeout);
  }

 private:
  std::shared_ptr<MatchmakingEnv> inner_;
};

// A peer whose DHT reads, once `gated` is set, wait for `release`: a leader on a loaded machine
// (64 real peers on 2 cores) was seen spending seconds in one read.
class GatedReadsEnv : public ForwardingEnv {
 public:
  using ForwardingEnv::ForwardingEnv;
  std::atomic<bool> gated{false};
  test::Notification read_started;
  test::Notification release;

  Future<std::optional<dht::DhtRunnerValue>> GetLatest(const std::string& key) override {
    if (gated) {
      read_started.Notify();
      release.WaitFor(milliseconds(20000));
    }
    return ForwardingEnv::GetLatest(key);
  }
};

// A peer that handles the first join it is asked at once but holds its answer until `release`:
// the answer reaches the asker after its request_timeout, as on a link that stalls.
class HeldFirstJoinReplyEnv : public ForwardingEnv {
 public:
  using ForwardingEnv::ForwardingEnv;
  test::Notification release;

  ~HeldFirstJoinReplyEnv() override {
    release.Notify();
    if (holder_.joinable()) holder_.join();
  }

  void RegisterUnary(const std::string& method, net::UnaryHandler handler) override {
    if (method != "matchmaking.v1.join") {
      ForwardingEnv::RegisterUnary(method, std::move(handler));
      return;
    }
    ForwardingEnv::RegisterUnary(
        method,
        [this, handler](const net::CallContext& ctx, net::Message request, net::Responder respond) {
          if (held_.exchange(true)) {
            handler(ctx, std::move(request), std::move(respond));
            return;
          }
          handler(ctx, std::move(request), [this, respond](Result<net::Message> answer) {
            holder_ = std::thread([this, respond, answer = std::move(answer)]() mutable {
              release.WaitFor(milliseconds(20000));
              respond(std::move(answer));
            });
          });
        });
  }

 private:
  std::atomic<bool> held_{false};
  std::thread holder_;
};

// A sim world whose first peer leads a group under `options.group_key` while stuck in a DHT read
// (its group then stays unsealed, whatever the others do), and `peers` other peers that join it.
class BusyLeaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    busy_leader_ = std::make_shared<GatedReadsEnv>(world_.AddPeer());
    matchmakers_.push_back(std::make_unique<Matchmaker>(busy_leader_));
  }

  static MatchmakingOptions Options(const std::string& key, int min_size, int target,
                                    milliseconds request_timeout) {
    MatchmakingOptions options;
    options.group_key = key;
    options.schema_hash = "schema-1";
    options.min_group_size = min_size;
    options.target_group_size = target;
    options.window = milliseconds(100);
    options.request_timeout = request_timeout;
    options.timeout = milliseconds(10000);
    return options;
  }

  // The leader declares first (so it leads), then enters a read that does not end until
  // ReleaseLeader(); then `followers` more peers start searching.
  void StartLeaderInASlowReadThenFollowers(const MatchmakingOptions& options, int followers) {
    results_.resize(1 + followers);
    // Threads get their matchmaker's pointer, never an element of matchmakers_, which the loop
    // below grows (and may move) while they run.
    Matchmaker* leader = matchmakers_[0].get();
    threads_.emplace_back([this, leader, options] { results_[0] = leader->FormGroup(options); });
    ASSERT_TRUE(world_.WaitUntil([&] { return world_.LiveSubkeys(options.group_key) == 1; },
                                 milliseconds(5000)));
    busy_leader_->gated = true;
    ASSERT_TRUE(busy_leader_->read_started.WaitFor(milliseconds(5000)));
    for (int i = 1; i <= followers; ++i) {
      follower_envs_.push_back(world_.AddPeer());
      matchmakers_.push_back(std::make_unique<Matchmaker>(follower_envs_.back()));
      Matchmaker* follower = matchmakers_.back().get();
      threads_.emplace_back(
          [this, i, follower, options] { results_[i] = follower->FormGroup(options); });
    }
  }

  size_t ServedByLeader(const std::string& method) {
    return world_.CallsServed(busy_leader_->peer_id(), method);
  }

  // Lets the leader go on, waits for every search, and checks that they all formed one group.
  void ReleaseLeaderAndExpectOneGroup() {
    busy_leader_->gated = false;
    busy_leader_->release.Notify();
    for (auto& thread : threads_) thread.join();
    threads_.clear();
    for (auto& result : results_) ASSERT_TRUE(result->ok()) << result->status().ToString();
    for (auto& result : results_) {
      EXPECT_EQ((*result)->group.members.size(), results_.size());
      EXPECT_EQ((*result)->group.Digest(), (*results_[0])->group.Digest());
    }
    EXPECT_TRUE((*results_[0])->led);
  }

  void TearDown() override {
    busy_leader_->release.Notify();
    for (auto& thread : threads_) thread.join();
  }

  SimMatchmakingWorld world_;
  std::shared_ptr<GatedReadsEnv> busy_leader_;
  std::vector<std::shared_ptr<MatchmakingEnv>> follower_envs_;
  std::vector<std::unique_ptr<Matchmaker>> matchmakers_;
  std::vector<std::optional<Result<FormedGroup>>> results_;
  std::vector<std::thread> threads_;
};

// Followers that a leader accepted wait for it while it answers that it still counts them in,
// however far past its window it is. They used to give up after the window + request_timeout and
// never ask it again: with every follower gone that way, no group of min_group_size could form
// under the key (64 real peers on a loaded machine, 2 runs in 3).
TEST_F(BusyLeaderTest, FollowersWaitForABusyLeaderThatStillCountsThemIn) {
  ASSERT_NO_FATAL_FAILURE(
      StartLeaderInASlowReadThenFollowers(Options("busy-leader", 3, 3, milliseconds(200)), 2));
  // Each follower checks on the leader every request_timeout. Six checks in all take each of them
  // well past the seal time + request_timeout after which they used to leave.
  EXPECT_TRUE(world_.WaitUntil([&] { return ServedByLeader("matchmaking.v1.alive") >= 6; },
                               milliseconds(5000)));
  ReleaseLeaderAndExpectOneGroup();
}

// A full leader's refusal lists its members, and the refused peer does not ask them one by one
// (each would only answer "following" that leader): under one key, walking past k full groups
// costs k round trips instead of k x target. The busy leader's full group stays unsealed while a
// later peer asks it.
TEST_F(BusyLeaderTest, ARefusedPeerSkipsTheFullGroupsMembers) {
  const auto options = Options("full-group", 2, 3, milliseconds(2000) * test::kSlowdown);
  ASSERT_NO_FATAL_FAILURE(StartLeaderInASlowReadThenFollowers(options, 2));
  ASSERT_TRUE(world_.WaitUntil([&] { return ServedByLeader("matchmaking.v1.join") == 2; },
                               milliseconds(5000)));
  // Declared after the two followers, so it may ask all three. Alone it cannot form a group: its
  // search ends at its timeout, before the skip (request_timeout from the refusal) would lapse,
  // yet with time to ask on a loaded machine (with 800 ms it failed once beside heavy tests).
  auto late = world_.AddPeer();
  Matchmaker late_matchmaker(late);
  MatchmakingOptions late_options = options;
  late_options.timeout = milliseconds(1500) * test::kSlowdown;
  auto refused = late_matchmaker.FormGroup(late_options);
  EXPECT_EQ(refused.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(ServedByLeader("matchmaking.v1.join"), 3u);
  for (const auto& follower : follower_envs_) {
    EXPECT_EQ(world_.CallsServed(follower->peer_id(), "matchmaking.v1.join"), 0u)
        << "the refused peer asked a member of the full group";
  }
  ReleaseLeaderAndExpectOneGroup();
}

// A peer whose join answer comes after its request_timeout may have been accepted all the same.
// It tells that leader it left, so the group the leader hands out holds only members that take
// part. Before, the leader listed it, its hand-out was refused, and the group reported it as an
// unconfirmed member (the all-reduce then waits for it).
TEST(MatchmakingLateJoinAnswerTest, APeerThatGaveUpOnAJoinIsNotHandedTheGroup) {
  SimMatchmakingWorld world;
  auto leader = std::make_shared<HeldFirstJoinReplyEnv>(world.AddPeer());
  auto gave_up = world.AddPeer();
  auto other = world.AddPeer();
  Matchmaker leader_matchmaker(leader);
  Matchmaker gave_up_matchmaker(gave_up);
  Matchmaker other_matchmaker(other);
  MatchmakingOptions options;
  options.group_key = "late-answer";
  options.schema_hash = "schema-1";
  options.min_group_size = 2;
  options.target_group_size = 3;  // with the peer that gave up still listed, the group fills
  options.window = milliseconds(2000);
  options.request_timeout = milliseconds(300);
  options.timeout = milliseconds(5000);

  std::optional<Result<FormedGroup>> led, gave_up_result, other_result;
  std::thread leader_thread([&] { led = leader_matchmaker.FormGroup(options); });
  ASSERT_TRUE(
      world.WaitUntil([&] { return world.LiveSubkeys("late-answer") == 1; }, milliseconds(5000)));
  MatchmakingOptions short_search = options;
  short_search.timeout = milliseconds(1500);
  std::thread gave_up_thread([&] { gave_up_result = gave_up_matchmaker.FormGroup(short_search); });
  // Its join was accepted, the answer is held, and it gives up on it after request_timeout.
  EXPECT_TRUE(world.WaitUntil(
      [&] { return world.CallsServed(leader->peer_id(), "matchmaking.v1.leave") == 1; },
      milliseconds(5000)));
  leader->release.Notify();
  std::thread other_thread([&] { other_result = other_matchmaker.FormGroup(options); });
  leader_thread.join();
  other_thread.join();
  gave_up_thread.join();

  ASSERT_TRUE(led->ok()) << led->status().ToString();
  ASSERT_TRUE(other_result->ok()) << other_result->status().ToString();
  EXPECT_EQ((*led)->group.members.size(), 2u);
  EXPECT_TRUE((*led)->unconfirmed_members.empty());
  for (const auto& member : (*led)->group.members) {
    EXPECT_NE(member.address.peer_id, gave_up->peer_id());
  }
  EXPECT_EQ((*other_result)->group.Digest(), (*led)->group.Digest());
  // Alone under the key afterwards (it asks only earlier peers), it fails at its timeout.
  EXPECT_EQ(gave_up_result->status().code(), StatusCode::kDeadlineExceeded);
}

// A peer left alone past its window does not seal a pair with the first peer to reach it: peers
// come in bursts (the orphans of a dead leader, peers that start together), and the rest of the
// burst would then be refused. The window restarts when the group becomes big enough. Before, a
// 13 + 2 split of 15 orphans was seen in a sanitizer CI run, most likely one orphan leading alone.
TEST(MatchmakingLateBurstTest, PeersThatReachALonePeerAfterItsWindowShareOneGroup) {
  SimMatchmakingWorld world;
  auto alone = world.AddPeer();
  auto first = world.AddPeer();
  auto second = world.AddPeer();
  Matchmaker alone_matchmaker(alone);
  Matchmaker first_matchmaker(first);
  Matchmaker second_matchmaker(second);
  MatchmakingOptions options;
  options.group_key = "late-burst";
  options.schema_hash = "schema-1";
  options.min_group_size = 2;
  options.window = milliseconds(400) * test::kSlowdown;
  options.request_timeout = milliseconds(300) * test::kSlowdown;
  options.timeout = milliseconds(5000) * test::kSlowdown;

  std::optional<Result<FormedGroup>> alone_result, first_result, second_result;
  // EXPECT, not ASSERT, until the threads are joined: every search ends by its timeout.
  std::thread alone_thread([&] { alone_result = alone_matchmaker.FormGroup(options); });
  EXPECT_TRUE(
      world.WaitUntil([&] { return world.LiveSubkeys("late-burst") == 1; }, milliseconds(5000)));
  // The burst starts once the lone peer's window is over (it began before its declaration): the
  // situation under test, not a synchronisation.
  std::this_thread::sleep_for(options.window + milliseconds(100));
  std::thread first_thread([&] { first_result = first_matchmaker.FormGroup(options); });
  EXPECT_TRUE(world.WaitUntil(
      [&] { return world.CallsServed(alone->peer_id(), "matchmaking.v1.join") >= 1; },
      milliseconds(5000)));
  std::thread second_thread([&] { second_result = second_matchmaker.FormGroup(options); });
  alone_thread.join();
  first_thread.join();
  second_thread.join();

  for (const auto* result : {&alone_result, &first_result, &second_result}) {
    ASSERT_TRUE((*result)->ok()) << (*result)->status().ToString();
    EXPECT_EQ((**result)->group.members.size(), 3u);
    EXPECT_EQ((**result)->group.Digest(), (*alone_result)->group.Digest());
  }
  EXPECT_TRUE((*alone_result)->led);
}

}  // namespace
}  // namespace hivemind::averaging
