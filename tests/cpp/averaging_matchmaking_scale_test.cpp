// The real Matchmaker (averaging/matchmaking.h) at the scale of a swarm: 256 and 1024 peers in one
// process on a SimMatchmakingWorld (an ideal in-memory DHT and calls dispatched on a small pool
// with a random latency), where real peers stop at ~180 per process for want of file descriptors.
// Shows: one key splits into consistent groups of at most the target, mostly full; Moshpit rounds
// on a 16x16 grid reach the exact global mean, and keep shrinking the error when 10% of the peers
// die; late peers find groups; followers whose leader dies regroup.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "averaging/group_key.h"
#include "averaging/matchmaking.h"
#include "averaging/matchmaking_env.h"
#include "averaging/matchmaking_sim_world.h"
#include "test_util.h"

namespace hivemind::averaging {
namespace {

using std::chrono::milliseconds;
using SteadyClock = std::chrono::steady_clock;

constexpr char kJoinMethod[] = "matchmaking.v1.join";

double SecondsSince(SteadyClock::time_point start) {
  return std::chrono::duration<double>(SteadyClock::now() - start).count();
}

// Doubles travel through the metadata bit-exactly ("%a"), so that "the exact mean" means exact.
std::string EncodeValue(double value) {
  char text[64];
  std::snprintf(text, sizeof(text), "%a", value);
  return text;
}
double DecodeValue(const std::string& text) { return std::strtod(text.c_str(), nullptr); }

std::vector<size_t> All(size_t n) {
  std::vector<size_t> all(n);
  for (size_t i = 0; i < n; ++i) all[i] = i;
  return all;
}

std::vector<double> RandomIntegers(size_t n) {
  std::mt19937_64 engine(3);
  std::uniform_int_distribution<int> pick(0, 999);
  std::vector<double> values(n);
  for (auto& v : values) v = pick(engine);
  return values;
}

double Mean(const std::vector<double>& values, const std::vector<size_t>& peers) {
  double sum = 0;
  for (size_t peer : peers) sum += values[peer];
  return sum / static_cast<double>(peers.size());
}

double RmsError(const std::vector<double>& values, const std::vector<size_t>& peers, double mean) {
  double sum = 0;
  for (size_t peer : peers) sum += (values[peer] - mean) * (values[peer] - mean);
  return std::sqrt(sum / static_cast<double>(peers.size()));
}

double MaxError(const std::vector<double>& values, const std::vector<size_t>& peers, double mean) {
  double worst = 0;
  for (size_t peer : peers) worst = std::max(worst, std::abs(values[peer] - mean));
  return worst;
}

// FormGroup calls running on threads of their own (FormGroup blocks), whose results the test can
// wait for as they come.
class Searches {
 public:
  ~Searches() { JoinAll(); }

  void Start(Matchmaker& matchmaker, size_t peer, MatchmakingOptions options) {
    threads_.emplace_back([this, &matchmaker, peer, options = std::move(options)] {
      auto result = matchmaker.FormGroup(options);
      std::lock_guard<std::mutex> lock(mutex_);
      results_.emplace(peer, std::move(result));
      done_.notify_all();
    });
  }

  // Bounded: true once at least `count` searches have ended.
  bool WaitForResults(size_t count, milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    return done_.wait_for(lock, timeout, [&] { return results_.size() >= count; });
  }

  std::map<size_t, Result<FormedGroup>> JoinAll() {
    for (auto& thread : threads_) thread.join();
    threads_.clear();
    std::lock_guard<std::mutex> lock(mutex_);
    return results_;
  }

 private:
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable done_;
  std::map<size_t, Result<FormedGroup>> results_;
};

// One group as its members reported it.
struct ReportedGroup {
  std::vector<size_t> members;  // peer indices, in group order
  std::vector<std::string> metadata;
  std::set<size_t> leaders;
};

class MatchmakingScaleTest : public ::testing::Test {
 protected:
  void StartSwarm(size_t size) {
    world_ = std::make_unique<SimMatchmakingWorld>(AsynchronousWorld());
    for (size_t i = 0; i < size; ++i) {
      auto env = world_->AddPeer();
      index_of_[env->peer_id()] = i;
      ids_.push_back(env->peer_id());
      matchmakers_.push_back(std::make_unique<Matchmaker>(env));
    }
  }

  // Asynchronous replies: every call and every reply takes 50–500 µs, in random order.
  static SimMatchmakingWorldOptions AsynchronousWorld() {
    SimMatchmakingWorldOptions options;
    options.threads = 2;
    options.min_latency = std::chrono::microseconds(50);
    options.max_latency = std::chrono::microseconds(500);
    options.seed = 7;
    return options;
  }

  static MatchmakingOptions Options(const std::string& key, int target) {
    MatchmakingOptions options;
    options.group_key = key;
    options.schema_hash = "schema-1";
    options.target_group_size = target;
    options.min_group_size = 2;
    options.window = milliseconds(1000) * test::kSlowdown;
    options.timeout = milliseconds(8000) * test::kSlowdown;
    // Squared: with hundreds of searches on the world's two delivery threads, a sanitizer build
    // answers some joins after 0.9 s, and a peer whose join reply comes after its
    // request_timeout is left out of the group that counted it (docs/matchmaking.md, "Known
    // limits").
    options.request_timeout = milliseconds(300) * test::kSlowdown * test::kSlowdown;
    return options;
  }

  // Checks that the results describe consistent groups and returns them by group id: every
  // member holds the same id, digest, order and metadata, sits at its own my_index, and reported
  // that very group (so nobody is listed in a group it did not join, and every peer that succeeded
  // is in exactly one group); exactly one member led; no size exceeds `target`.
  std::map<std::string, ReportedGroup> CheckGroups(
      const std::map<size_t, Result<FormedGroup>>& results, int target) {
    std::map<std::string, ReportedGroup> groups;
    std::map<std::string, std::string> digests;
    std::map<size_t, std::string> group_of;
    for (const auto& [peer, result] : results) {
      if (!result.ok()) continue;
      const FormedGroup& formed = result.value();
      const Group& group = formed.group;
      EXPECT_EQ(group.members.at(group.my_index).address.peer_id, ids_[peer]);
      EXPECT_TRUE(formed.unconfirmed_members.empty()) << "peer " << peer;
      EXPECT_LE(static_cast<int>(group.members.size()), target);
      EXPECT_TRUE(group_of.emplace(peer, group.id).second);
      auto [it, first] = groups.try_emplace(group.id);
      ReportedGroup& reported = it->second;
      std::vector<size_t> members;
      for (const auto& m : group.members) members.push_back(index_of_.at(m.address.peer_id));
      if (first) {
        reported.members = members;
        reported.metadata = formed.metadata;
        digests[group.id] = group.Digest();
      } else {
        EXPECT_EQ(members, reported.members) << "members disagree on the order";
        EXPECT_EQ(formed.metadata, reported.metadata);
        EXPECT_EQ(group.Digest(), digests[group.id]);
      }
      if (formed.led) reported.leaders.insert(peer);
    }
    for (const auto& [id, reported] : groups) {
      EXPECT_EQ(reported.leaders.size(), 1u);
      for (size_t member : reported.members) {
        auto it = group_of.find(member);
        EXPECT_TRUE(it != group_of.end() && it->second == id)
            << "peer " << member << " is listed in a group it did not report";
      }
    }
    return groups;
  }

  // Every peer under one key, all at once, with metadata "meta-<index>": every peer must end in
  // a consistent group of at most `target`, holding every member's metadata. Returns the sizes.
  std::vector<size_t> FormUnderOneKey(size_t peers, int target) {
    const std::string key = "scale.onekey" + std::to_string(peers);
    const auto start = SteadyClock::now();
    Searches searches;
    for (size_t i = 0; i < peers; ++i) {
      auto options = Options(key, target);
      options.metadata = "meta-" + std::to_string(i);
      searches.Start(*matchmakers_[i], i, options);
    }
    auto results = searches.JoinAll();
    const double seconds = SecondsSince(start);
    std::vector<size_t> sizes;
    for (const auto& [peer, result] : results) {
      EXPECT_TRUE(result.ok()) << "peer " << peer << ": " << result.status().ToString();
    }
    for (const auto& [id, group] : CheckGroups(results, target)) {
      sizes.push_back(group.members.size());
      for (size_t j = 0; j < group.members.size(); ++j) {
        EXPECT_EQ(group.metadata[j], "meta-" + std::to_string(group.members[j]));
      }
    }
    std::sort(sizes.begin(), sizes.end());
    std::string listed;
    for (size_t size : sizes) listed += " " + std::to_string(size);
    std::printf("  %zu peers, target %d: %zu groups (sizes%s) in %.2f s, %llu calls\n", peers,
                target, sizes.size(), listed.c_str(), seconds,
                static_cast<unsigned long long>(world_->calls_delivered()));
    return sizes;
  }

  // Ranks 0..side^2-1 on a side x side grid: `side` peers under each of `side` keys.
  std::vector<GroupKeyManager> MakeGrid(int side) {
    std::vector<GroupKeyManager> keys;
    for (int rank = 0; rank < side * side; ++rank) {
      GroupKeyOptions options;
      options.prefix = "moshpit";
      options.schema_hash = "schema-1";
      options.grid_side = side;
      options.grid_dims = 2;
      options.rank = rank;
      keys.push_back(GroupKeyManager::Create(options).value());
    }
    return keys;
  }

  // One Moshpit round for `peers`: each searches under its current key with its value as metadata,
  // each group "averages" by the metadata all-gather, and each member moves its key on. Peers
  // whose search failed keep their value and key.
  std::map<size_t, Result<FormedGroup>> MoshpitRound(std::vector<GroupKeyManager>& keys,
                                                     std::vector<double>& values,
                                                     const std::vector<size_t>& peers, int target,
                                                     MatchmakingOptions options) {
    const auto start = SteadyClock::now();
    Searches searches;
    for (size_t peer : peers) {
      options.group_key = keys[peer].CurrentKey();
      options.metadata = EncodeValue(values[peer]);
      searches.Start(*matchmakers_[peer], peer, options);
    }
    auto results = searches.JoinAll();
    const double seconds = SecondsSince(start);
    CheckGroups(results, target);
    for (const auto& [peer, result] : results) {
      if (!result.ok()) continue;
      double sum = 0;
      for (const auto& text : result->metadata) sum += DecodeValue(text);
      values[peer] = sum / static_cast<double>(result->metadata.size());
      EXPECT_TRUE(keys[peer]
                      .OnGroupAssembled(result->group.id, result->group.my_index,
                                        static_cast<int>(result->group.members.size()))
                      .ok());
    }
    std::printf("  a Moshpit round of %zu peers took %.2f s\n", peers.size(), seconds);
    return results;
  }

  void TearDown() override {
    matchmakers_.clear();
    if (world_) world_->Shutdown();
  }

  std::unique_ptr<SimMatchmakingWorld> world_;
  std::vector<net::PeerId> ids_;
  std::map<net::PeerId, size_t> index_of_;
  std::vector<std::unique_ptr<Matchmaker>> matchmakers_;
};

// The world the tests below stand on behaves like a network: replies come later, unanswered calls
// time out, a killed peer is unreachable and can no longer use its DHT.
TEST(SimMatchmakingWorld, CallsTimeOutAndKilledPeersAreUnreachable) {
  SimMatchmakingWorldOptions options;
  options.min_latency = std::chrono::microseconds(200);
  options.max_latency = std::chrono::microseconds(400);
  SimMatchmakingWorld world(options);
  auto a = world.AddPeer();
  auto b = world.AddPeer();
  b->RegisterUnary("echo",
                   [](const net::CallContext& ctx, net::Message request, net::Responder respond) {
                     respond(net::Message(request.header + " from " + ctx.peer.ToString()));
                   });
  b->RegisterUnary("silent", [](const net::CallContext&, net::Message, net::Responder) {});
  const auto b_address = net::PeerAddress::Parse(b->visible_addresses().at(0)).value();
  const auto start = SteadyClock::now();
  auto answer = test::Await(a->Call(b_address, "echo", net::Message("hi"), milliseconds(1000)));
  ASSERT_TRUE(answer.ok()) << answer.status().ToString();
  EXPECT_GE(SecondsSince(start), 400e-6);  // there and back, at least 200 µs each way
  EXPECT_EQ(answer->header, "hi from " + a->peer_id().ToString());
  EXPECT_EQ(world.CallsServed(b->peer_id(), "echo"), 1u);

  auto silent = test::Await(a->Call(b_address, "silent", net::Message(), milliseconds(50)));
  EXPECT_EQ(silent.status().code(), StatusCode::kDeadlineExceeded);

  ASSERT_TRUE(a->StoreSubkey("key", a->owner_marker(), "declared", a->Now() + 10).Wait().ok());
  auto read = b->GetLatest("key").Wait();
  ASSERT_TRUE(read.ok() && read->has_value());
  EXPECT_EQ((*read)->dictionary.at(a->owner_marker()).value, "declared");

  world.Kill(b->peer_id());
  EXPECT_FALSE(b->is_running());
  auto dead = test::Await(a->Call(b_address, "echo", net::Message("hi"), milliseconds(1000)));
  EXPECT_EQ(dead.status().code(), StatusCode::kUnavailable);
  EXPECT_FALSE(b->GetLatest("key").Wait().ok());
}

// First come, first served: the earliest leader not yet sealed fills to the target before any later
// peer gathers a group, so when every peer has declared before the first window ends, N =
// k x target peers make k full groups (what a quiet plain build shows: all 16 full). Peers that
// read the declarations before an earlier one's landed gather followers until their next read, and
// those they then disband may find the groups they fall back to sealed: when the walk outlasts
// the window (a loaded machine, the sanitizers) the last leaders seal short groups. Until full
// groups named their members in refusals and peer ids decoded fast, that was 4 sanitizer runs in
// 8 here (5 full groups of 8 in one CI run); 14/14 full since, 6 of them beside a CPU hog. The
// floor: three quarters of the peers end in full groups.
void ExpectMostlyFull(const std::vector<size_t>& sizes, size_t peers, size_t target) {
  const size_t full = std::count(sizes.begin(), sizes.end(), target);
  EXPECT_GE(full * target * 4, peers * 3) << full << " full groups of " << target;
}

// 256 peers; 128 under the sanitizers, where every leader's re-reading of 256 declarations
// (O(N^2) in one process, docs/matchmaking.md) stretches the walk to 9-25 s: short groups, and
// peers that reach the last open leader after it sealed end alone.
TEST_F(MatchmakingScaleTest, HundredsOfPeersUnderOneKeySplitIntoFullGroupsOfSixteen) {
  const size_t peers = test::kSlowdown > 1 ? 128 : 256;
  StartSwarm(peers);
  ExpectMostlyFull(FormUnderOneKey(peers, 16), peers, 16);
}

TEST_F(MatchmakingScaleTest, MoshpitOnASixteenBySixteenGridGivesEveryPeerTheExactMeanInTwoRounds) {
  StartSwarm(256);
  auto keys = MakeGrid(16);
  auto values = RandomIntegers(256);
  const double mean = Mean(values, All(256));
  for (int round = 1; round <= 2; ++round) {
    auto results = MoshpitRound(keys, values, All(256), 16, Options("", 16));
    for (const auto& [peer, result] : results) {
      ASSERT_TRUE(result.ok()) << "round " << round << ", peer " << peer << ": "
                               << result.status().ToString();
      ASSERT_EQ(result->group.members.size(), 16u);
    }
    std::printf("  round %d: max |value - mean| = %g\n", round, MaxError(values, All(256), mean));
  }
  // Integers, sums of 16 and divisions by 16 are exact in doubles: "exact" means bit for bit.
  for (size_t i = 0; i < 256; ++i) EXPECT_EQ(values[i], mean) << "peer " << i;
}

// 1024 peers; 576 (a 24 x 24 grid) under the sanitizers, where 1024 searches on the world's two
// delivery threads backed calls up past request_timeout in 1 run in 2 (leaders' hand-outs went
// unconfirmed and rounds took 75 s): the protocol's scale is checked by the plain build.
TEST_F(MatchmakingScaleTest, MoshpitOnAThirtyTwoByThirtyTwoGridGivesThousandPeersTheExactMean) {
  const int side = test::kSlowdown > 1 ? 24 : 32;
  const size_t count = static_cast<size_t>(side) * side;
  StartSwarm(count);
  auto keys = MakeGrid(side);
  auto values = RandomIntegers(count);
  const double mean = Mean(values, All(count));
  // The last peer of a key can still be walking the earlier ones when the window ends. Groups
  // seal when full at once; the longer timeouts only bound stragglers.
  MatchmakingOptions options = Options("", side);
  options.window *= test::kSlowdown;
  options.timeout *= test::kSlowdown;
  for (int round = 1; round <= 2; ++round) {
    auto results = MoshpitRound(keys, values, All(count), side, options);
    for (const auto& [peer, result] : results) {
      ASSERT_TRUE(result.ok()) << "round " << round << ", peer " << peer << ": "
                               << result.status().ToString();
      ASSERT_EQ(result->group.members.size(), static_cast<size_t>(side));
    }
  }
  // Exact with 32 (means of powers of two); with 24, within rounding.
  for (size_t i = 0; i < count; ++i)
    EXPECT_NEAR(values[i], mean, 1e-12 * std::abs(mean)) << "peer " << i;
}

TEST_F(MatchmakingScaleTest, MoshpitWithTenPercentKilledBeforeRoundTwoStillShrinksTheError) {
  StartSwarm(256);
  auto keys = MakeGrid(16);
  auto values = RandomIntegers(256);
  auto results = MoshpitRound(keys, values, All(256), 16, Options("", 16));
  for (const auto& [peer, result] : results) ASSERT_TRUE(result.ok()) << "peer " << peer;

  std::vector<size_t> order = All(256);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(11));
  const std::set<size_t> killed(order.begin(), order.begin() + 26);
  std::vector<size_t> survivors;
  for (size_t i = 0; i < 256; ++i) {
    if (killed.count(i)) {
      world_->Kill(ids_[i]);
    } else {
      survivors.push_back(i);
    }
  }
  // Round 2 mixes along the other dimension: each key held one peer of every round-1 group, and
  // now lacks the dead ones, so the leaders seal short groups at the end of their window.
  const double mean = Mean(values, survivors);
  const double rms_before = RmsError(values, survivors, mean);
  const double max_before = MaxError(values, survivors, mean);
  auto options = Options("", 16);
  options.window = milliseconds(500) * test::kSlowdown;
  results = MoshpitRound(keys, values, survivors, 16, options);
  size_t groups = 0;
  for (const auto& [peer, result] : results) {
    ASSERT_TRUE(result.ok()) << "peer " << peer << ": " << result.status().ToString();
    groups += result->led ? 1 : 0;
  }
  // Averaging inside groups of survivors keeps their sum; every group draws from several round-1
  // groups, so the spread of the survivors' values shrinks.
  EXPECT_NEAR(Mean(values, survivors), mean, 1e-9 * std::abs(mean));
  const double rms_after = RmsError(values, survivors, mean);
  const double max_after = MaxError(values, survivors, mean);
  std::printf("  %zu survivors in %zu groups: rms error %g -> %g, max %g -> %g\n", survivors.size(),
              groups, rms_before, rms_after, max_before, max_after);
  EXPECT_LT(rms_after, rms_before / 2);
  EXPECT_LT(max_after, max_before);
}

TEST_F(MatchmakingScaleTest, PeersThatStartLateFillTheGroupsStillOpen) {
  StartSwarm(256);
  // 200 early peers make 12 full groups and one of 8 whose leader waits its window; the 56 late
  // ones start once those 12 groups are done, ask the earliest peers first, and so fill the open
  // group before they make 3 of their own.
  auto options = Options("scale.late", 16);
  // Groups seal as soon as they are full, so a long window costs nothing when all goes well; it
  // keeps partial groups open until the late peers find them. With 3 s (9 s under the
  // sanitizers), 1 sanitizer run in 9 saw windows end first and sealed groups of 2 to 5.
  options.window = milliseconds(10000) * test::kSlowdown;
  options.timeout = milliseconds(20000) * test::kSlowdown;
  Searches searches;
  for (size_t i = 0; i < 200; ++i) searches.Start(*matchmakers_[i], i, options);
  ASSERT_TRUE(searches.WaitForResults(192, milliseconds(5000) * test::kSlowdown))
      << "the 200 early peers did not make 12 full groups";
  const auto late_start = SteadyClock::now();
  for (size_t i = 200; i < 256; ++i) searches.Start(*matchmakers_[i], i, options);
  auto results = searches.JoinAll();
  const double late_seconds = SecondsSince(late_start);
  for (const auto& [peer, result] : results) {
    ASSERT_TRUE(result.ok()) << "peer " << peer << ": " << result.status().ToString();
  }
  auto groups = CheckGroups(results, 16);
  size_t mixed = 0;
  for (const auto& [id, group] : groups) {
    EXPECT_EQ(group.members.size(), 16u);
    const size_t late = std::count_if(group.members.begin(), group.members.end(),
                                      [](size_t peer) { return peer >= 200; });
    mixed += late > 0 && late < group.members.size() ? 1 : 0;
  }
  EXPECT_EQ(groups.size(), 16u);
  EXPECT_GE(mixed, 1u) << "no late peer joined a group an early peer had gathered";
  std::printf(
      "  %zu groups, %zu of them early and late peers together; late peers done in %.2f s\n",
      groups.size(), mixed, late_seconds);
}

TEST_F(MatchmakingScaleTest, SixteenLeadersKilledMidSearchLeaveTheirFollowersGroups) {
  StartSwarm(256);
  // 16 keys of 16 peers. No target: a leader holds its group open for its whole window, so it can
  // be killed while its 15 followers wait on it. The leaders' window outlasts the joins however
  // loaded the machine is (they are killed long before it ends); the followers', which their
  // regroup uses, is short.
  auto options_for = [](size_t key, bool leader = false) {
    auto options = Options("scale.leaderdies." + std::to_string(key), 0);
    options.window = milliseconds(leader ? 20000 : 600) * test::kSlowdown;
    options.timeout = std::max(options.timeout, options.window * 2);
    return options;
  };
  Searches searches;
  std::vector<size_t> leaders;
  for (size_t key = 0; key < 16; ++key) {
    leaders.push_back(16 * key);
    searches.Start(*matchmakers_[16 * key], 16 * key, options_for(key, /*leader=*/true));
  }
  // The leaders declare first (so they lead); then the followers join them.
  ASSERT_TRUE(world_->WaitUntil(
      [&] {
        for (size_t key = 0; key < 16; ++key) {
          if (world_->LiveSubkeys(options_for(key).group_key) < 1) return false;
        }
        return true;
      },
      milliseconds(5000) * test::kSlowdown));
  const auto start = SteadyClock::now();
  for (size_t i = 0; i < 256; ++i) {
    if (i % 16 != 0) searches.Start(*matchmakers_[i], i, options_for(i / 16));
  }
  ASSERT_TRUE(world_->WaitUntil(
      [&] {
        for (size_t leader : leaders) {
          if (world_->CallsServed(ids_[leader], kJoinMethod) < 15) return false;
        }
        return true;
      },
      milliseconds(5000) * test::kSlowdown))
      << "the followers did not all ask their leader";
  for (size_t leader : leaders) world_->Kill(ids_[leader]);
  auto results = searches.JoinAll();
  const double seconds = SecondsSince(start);
  // A dead leader's own search ends too, with an error (its node is gone).
  for (size_t leader : leaders) {
    ASSERT_FALSE(results.at(leader).ok());
    EXPECT_EQ(results.at(leader).status().code(), StatusCode::kCancelled);
  }
  // The followers notice only by the timer (promised seal time + request_timeout), leave, and the
  // earliest of them leads the others under the same key.
  for (const auto& [peer, result] : results) {
    if (peer % 16 == 0) continue;
    ASSERT_TRUE(result.ok()) << "peer " << peer << ": " << result.status().ToString();
    EXPECT_EQ(result->group_key, options_for(peer / 16).group_key);
    EXPECT_EQ(result->group.members.size(), 15u);
  }
  auto groups = CheckGroups(results, 15);
  EXPECT_EQ(groups.size(), 16u);
  std::printf("  240 followers of 16 dead leaders regrouped in %.2f s\n", seconds);
}

}  // namespace
}  // namespace hivemind::averaging
