// swarm::SwarmAverager in a standalone launch of real nodes: identical means, all-gather, a member
// that dies is dropped by every survivor alike; and the group description's wire form.
#include "swarm/swarm_averager.h"

#include <gtest/gtest.h>

#include <memory>
#include <thread>
#include <vector>

#include "averaging/allreduce.h"
#include "swarm/swarm_group.h"
#include "test_util.h"

namespace hivemind::swarm {
namespace {

using test::Clock;

struct Rank {
  std::unique_ptr<net::Node> node = test::StartNode();
  std::unique_ptr<Mailbox> mailbox = std::make_unique<Mailbox>(*node);
  std::unique_ptr<averaging::AllReduceService> service =
      std::make_unique<averaging::AllReduceService>(*node);
  std::unique_ptr<SwarmAverager> averager;
};

std::vector<std::unique_ptr<Rank>> Launch(int size) {
  std::vector<std::unique_ptr<Rank>> ranks;
  std::vector<net::PeerAddress> addresses;
  for (int r = 0; r < size; ++r) {
    ranks.push_back(std::make_unique<Rank>());
    addresses.push_back(ranks.back()->node->visible_address());
  }
  for (int r = 0; r < size; ++r) {
    SwarmOptions options;
    options.allreduce.sender_timeout = std::chrono::milliseconds(3000);
    options.allreduce.reducer_timeout = std::chrono::milliseconds(5000);
    ranks[r]->averager =
        std::make_unique<SwarmAverager>(*ranks[r]->mailbox, *ranks[r]->service, nullptr, nullptr,
                                        LaunchInfo{"launch0", r, addresses}, options);
  }
  return ranks;
}

// Runs one Mean on each of `ranks` (indices) at once; returns their data and reports.
std::vector<std::pair<std::vector<float>, Result<MeanReport>>> MeanOn(
    std::vector<std::unique_ptr<Rank>>& ranks, const std::vector<int>& which) {
  std::vector<std::pair<std::vector<float>, Result<MeanReport>>> out(
      which.size(), {std::vector<float>(), Status(StatusCode::kInternal, "not run")});
  std::vector<std::thread> threads;
  for (size_t i = 0; i < which.size(); ++i) {
    threads.emplace_back([&, i] {
      const int r = which[i];
      std::vector<float> data(1000, static_cast<float>(r + 1));
      auto report = ranks[r]->averager->Mean(data, Clock::now() + std::chrono::seconds(30), "sig");
      out[i] = {std::move(data), std::move(report)};
    });
  }
  for (auto& thread : threads) thread.join();
  return out;
}

TEST(SwarmAverager, MeanIsIdenticalAndAllGatherKeepsOrder) {
  auto ranks = Launch(3);
  auto results = MeanOn(ranks, {0, 1, 2});
  for (auto& [data, report] : results) {
    ASSERT_TRUE(report.ok()) << report.status().ToString();
    EXPECT_EQ(report->contributors.size(), 3u);
    EXPECT_EQ(data, results[0].first);
    EXPECT_FLOAT_EQ(data[0], 2.0f);
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      auto gathered = ranks[r]->averager->AllGather(net::Payload::FromString(std::to_string(r)),
                                                    Clock::now() + std::chrono::seconds(30), "sig");
      ASSERT_TRUE(gathered.ok()) << gathered.status().ToString();
      const SwarmGroup& group = gathered->first;
      for (size_t i = 0; i < group.members.size(); ++i) {
        EXPECT_EQ(gathered->second[i].ToString(), std::to_string(group.members[i].rank));
      }
    });
  }
  for (auto& thread : threads) thread.join();
}

TEST(SwarmAverager, SurvivorsDropADeadMemberAlikeAndGoOn) {
  auto ranks = Launch(4);
  for (auto& [data, report] : MeanOn(ranks, {0, 1, 2, 3})) ASSERT_TRUE(report.ok());
  ranks[3]->averager.reset();
  ranks[3]->service.reset();
  ranks[3]->mailbox.reset();
  ranks[3]->node->Shutdown();
  const auto start = Clock::now();
  auto results = MeanOn(ranks, {0, 1, 2});
  EXPECT_LT(test::SecondsSince(start), 10.0);
  for (auto& [data, report] : results) {
    ASSERT_TRUE(report.ok()) << report.status().ToString();
    EXPECT_EQ(report->contributors, (std::vector<int>{0, 1, 2}));
    EXPECT_EQ(data, results[0].first);
    EXPECT_FLOAT_EQ(data[0], 2.0f);  // mean of 1, 2, 3
  }
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(ranks[r]->averager->group().has_value());
    EXPECT_EQ(ranks[r]->averager->group()->members.size(), 3u);
  }
  // And the next round runs in the shrunk group.
  for (auto& [data, report] : MeanOn(ranks, {0, 1, 2})) {
    ASSERT_TRUE(report.ok()) << report.status().ToString();
    EXPECT_EQ(report->group.members.size(), 3u);
  }
}

TEST(SwarmGroup, FingerprintTellsApartPartsOfOneGroupThatDisagree) {
  auto a = test::StartNode();
  auto b = test::StartNode();
  auto c = test::StartNode();
  SwarmGroup whole;
  whole.id = "g.1";
  whole.members = {SwarmMember{a->visible_address(), "la", 0, 1},
                   SwarmMember{b->visible_address(), "lb", 0, 1},
                   SwarmMember{c->visible_address(), "lc", 0, 1}};
  SwarmGroup copy = whole;
  copy.my_index = 2;  // a member's own position is not part of the group
  EXPECT_EQ(whole.Fingerprint(), copy.Fingerprint());
  EXPECT_EQ(whole.Fingerprint().size(), 32u);

  // After one shrink, two sides that kept different members share the id "g.1" but not the
  // fingerprint; nor does the group before the shrink.
  SwarmGroup pair = whole;
  pair.members.pop_back();
  SwarmGroup alone = whole;
  alone.members.erase(alone.members.begin(), alone.members.begin() + 2);
  EXPECT_NE(pair.Fingerprint(), alone.Fingerprint());
  EXPECT_NE(pair.Fingerprint(), whole.Fingerprint());
  SwarmGroup renamed = whole;
  renamed.id = "g.2";
  EXPECT_NE(renamed.Fingerprint(), whole.Fingerprint());
}

TEST(SwarmGroup, RoundTripsAndRefusesMalformedDescriptions) {
  auto a = test::StartNode();
  auto b = test::StartNode();
  SwarmGroup group;
  group.id = "abc123";
  group.members = {SwarmMember{a->visible_address(), "l1", 0, 2},
                   SwarmMember{b->visible_address(), "l1", 1, 2}};
  auto decoded = SwarmGroup::Decode(group.Encode(), b->peer_id());
  ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
  EXPECT_EQ(decoded->id, "abc123");
  EXPECT_EQ(decoded->my_index, 1);
  EXPECT_EQ(decoded->members[0].address.peer_id, a->peer_id());
  EXPECT_EQ(decoded->members[1].launch_size, 2);

  auto stranger = test::StartNode();
  EXPECT_EQ(SwarmGroup::Decode(group.Encode(), stranger->peer_id()).status().code(),
            StatusCode::kProtocolError);
  for (const std::string& bad :
       {std::string(""), std::string("nonsense\nid\n"), std::string("hivemind-swarm-group-v1\n"),
        std::string("hivemind-swarm-group-v1\nid\nl1\t5\t2\t") + a->visible_address().ToString(),
        std::string("hivemind-swarm-group-v1\nid\nl1\tx\t2\t/ip4/1.2.3.4/tcp/1")}) {
    EXPECT_EQ(SwarmGroup::Decode(bad, a->peer_id()).status().code(), StatusCode::kProtocolError)
        << bad;
  }
}

}  // namespace
}  // namespace hivemind::swarm
