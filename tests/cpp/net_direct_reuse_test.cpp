// Kept direct connections (NodeOptions::direct_idle_timeout): a direct stream that ended cleanly
// leaves its connection to carry the next stream to the same peer; one that failed, or whose peer
// closed it or went away, never carries another.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "net/node.h"
#include "test_util.h"

namespace hivemind::net {
namespace {

using test::Await;
using test::EchoStream;
using test::MakeMessage;
using test::PatternString;
using test::ReadAll;
using test::StartNode;
using test::TestNodeOptions;
using test::WaitUntil;

constexpr size_t kMiB = size_t{1} << 20;
constexpr Milliseconds kSettle{5000 * test::kSlowdown};

NodeOptions Options(bool encryption) {
  NodeOptions options = TestNodeOptions();
  options.encryption = encryption;
  return options;
}

// Echoes a few messages on a fresh direct stream from `client` to `server`, one of them several
// cipher records long, and checks what comes back and that the stream was direct.
::testing::AssertionResult DirectEchoWorks(Node& client, Node& server, uint64_t seed) {
  auto stream = client.OpenStream(server.visible_address(), "echo_stream",
                                  CallOptions{Milliseconds(20000), /*direct=*/true});
  const std::vector<std::string> payloads = {PatternString(5 * kMiB / 2, seed), "",
                                             PatternString(1000, seed + 1)};
  std::vector<Future<Empty>> writes;
  for (size_t i = 0; i < payloads.size(); ++i) {
    writes.push_back(stream->Write(MakeMessage("m" + std::to_string(i), {payloads[i]})));
  }
  stream->CloseWrite();
  auto echoed = ReadAll(*stream);
  if (!echoed.ok()) return ::testing::AssertionFailure() << echoed.status().ToString();
  if (echoed->size() != payloads.size()) {
    return ::testing::AssertionFailure() << echoed->size() << " echoes of " << payloads.size();
  }
  for (size_t i = 0; i < payloads.size(); ++i) {
    const Message& got = (*echoed)[i];
    if (got.header != "m" + std::to_string(i) || got.payloads.size() != 1 ||
        got.payloads[0].ToString() != payloads[i]) {
      return ::testing::AssertionFailure() << "echo " << i << " differs";
    }
  }
  for (auto& write : writes) {
    auto written = Await(write);
    if (!written.ok()) return ::testing::AssertionFailure() << written.status().ToString();
  }
  if (!stream->direct()) return ::testing::AssertionFailure() << "the stream was not direct";
  return ::testing::AssertionSuccess();
}

class DirectReuseTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { Start(Options(GetParam()), Options(GetParam())); }

  void Start(NodeOptions server_options, NodeOptions client_options) {
    client_.reset();
    server_.reset();
    server_ = StartNode(server_options);
    ASSERT_NE(server_, nullptr);
    client_ = StartNode(client_options);
    ASSERT_NE(client_, nullptr);
    server_->RegisterStream("echo_stream", [this](const CallContext& context, Stream& stream) {
      ++handlers_;
      return EchoStream(context, stream);
    });
  }

  // Both ends of `count` connections kept: the client's for its next streams, the server's
  // waiting for them.
  bool KeptBothEnds(size_t count) {
    return WaitUntil(
        [&] {
          return client_->direct_connections().idle == count &&
                 server_->direct_connections().served_idle == count;
        },
        kSettle);
  }

  std::atomic<int> handlers_{0};  // before the nodes: their handler threads use it
  std::unique_ptr<Node> server_;
  std::unique_ptr<Node> client_;
};

TEST_P(DirectReuseTest, SequentialStreamsToOnePeerShareOneConnection) {
  constexpr int kStreams = 6;
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(DirectEchoWorks(*client_, *server_, 10 * i)) << "stream " << i;
    ASSERT_TRUE(KeptBothEnds(1)) << "after stream " << i;
  }
  const DirectConnectionStats stats = client_->direct_connections();
  EXPECT_EQ(stats.dialed, 1u);
  EXPECT_EQ(stats.reused, static_cast<uint64_t>(kStreams - 1));
  EXPECT_EQ(handlers_.load(), kStreams);
  EXPECT_EQ(server_->direct_connections().dialed, 0u) << "the server dialed for a client's stream";
}

TEST_P(DirectReuseTest, StreamsOpenAtOnceGetConnectionsOfTheirOwn) {
  constexpr int kAtOnce = 3;
  for (int round = 0; round < 2; ++round) {
    std::vector<std::shared_ptr<Stream>> streams;
    for (int i = 0; i < kAtOnce; ++i) {
      streams.push_back(client_->OpenStream(server_->visible_address(), "echo_stream",
                                            CallOptions{Milliseconds(20000), true}));
      // Each echo completes before any stream closes: all of them are open at once.
      ASSERT_TRUE(Await(streams.back()->Write(
                            MakeMessage("s" + std::to_string(i), {PatternString(kMiB, i)})))
                      .ok());
      auto echoed = Await(streams.back()->Read());
      ASSERT_TRUE(echoed.ok() && echoed->has_value()) << "stream " << i;
      EXPECT_EQ((*echoed)->header, "s" + std::to_string(i));
      EXPECT_EQ((*echoed)->payloads.at(0).ToString(), PatternString(kMiB, i));
      EXPECT_TRUE(streams.back()->direct());
    }
    for (auto& stream : streams) {
      stream->CloseWrite();
      auto end = ReadAll(*stream);
      ASSERT_TRUE(end.ok()) << end.status().ToString();
      EXPECT_TRUE(end->empty());
    }
    ASSERT_TRUE(KeptBothEnds(kAtOnce)) << "round " << round;
  }
  const DirectConnectionStats stats = client_->direct_connections();
  EXPECT_EQ(stats.dialed, static_cast<uint64_t>(kAtOnce));
  EXPECT_EQ(stats.reused, static_cast<uint64_t>(kAtOnce));
}

TEST_P(DirectReuseTest, AStreamThatFailedLeavesNoConnectionBehind) {
  ASSERT_TRUE(DirectEchoWorks(*client_, *server_, 1));
  ASSERT_TRUE(KeptBothEnds(1));
  // Cancelled in the middle: the connection may hold half a frame, so it must not carry the next
  // stream (which would then read garbage).
  auto cancelled = client_->OpenStream(server_->visible_address(), "echo_stream",
                                       CallOptions{Milliseconds(20000), true});
  ASSERT_TRUE(Await(cancelled->Write(MakeMessage("half", {PatternString(4 * kMiB, 2)}))).ok());
  cancelled->Cancel();
  auto read = Await(cancelled->Read());
  EXPECT_FALSE(read.ok()) << "a cancelled stream still delivered a message";

  ASSERT_TRUE(DirectEchoWorks(*client_, *server_, 3));
  const DirectConnectionStats stats = client_->direct_connections();
  EXPECT_EQ(stats.dialed, 2u) << "the stream after the cancelled one did not dial afresh";
  EXPECT_EQ(stats.reused, 1u);

  // A handler that fails its stream: the caller gets the error, and the next stream still works.
  server_->RegisterStream("refuse", [](const CallContext&, Stream&) {
    return Status(StatusCode::kPermissionDenied, "TEST: not you");
  });
  ASSERT_TRUE(KeptBothEnds(1));
  auto refused = client_->OpenStream(server_->visible_address(), "refuse",
                                     CallOptions{Milliseconds(20000), true});
  auto ended = ReadAll(*refused);
  ASSERT_FALSE(ended.ok());
  EXPECT_EQ(ended.status().code(), StatusCode::kPermissionDenied) << ended.status().ToString();
  EXPECT_TRUE(DirectEchoWorks(*client_, *server_, 4));
}

TEST_P(DirectReuseTest, AConnectionThePeerClosedIsReplacedByAFreshOne) {
  NodeOptions server_options = Options(GetParam());
  server_options.direct_idle_timeout = Milliseconds(100);  // closes its end after 1.2 s
  Start(server_options, Options(GetParam()));
  ASSERT_TRUE(DirectEchoWorks(*client_, *server_, 1));
  ASSERT_TRUE(KeptBothEnds(1));
  ASSERT_TRUE(WaitUntil([&] { return server_->direct_connections().served_idle == 0; }, kSettle))
      << "the server kept its end of an idle connection past its timeout";
  EXPECT_EQ(client_->direct_connections().idle, 1u) << "the client's timeout is 20 s";
  ASSERT_TRUE(DirectEchoWorks(*client_, *server_, 2));
  const DirectConnectionStats stats = client_->direct_connections();
  EXPECT_EQ(stats.dialed, 2u);
  EXPECT_EQ(stats.reused, 0u);
  EXPECT_EQ(handlers_.load(), 2);
}

TEST_P(DirectReuseTest, APeerThatShutDownFailsTheNextStreamPromptly) {
  ASSERT_TRUE(DirectEchoWorks(*client_, *server_, 1));
  ASSERT_TRUE(KeptBothEnds(1));
  const PeerAddress gone = server_->visible_address();
  server_->Shutdown();  // must not wait on the connection it keeps for the client
  const auto start = test::Clock::now();
  auto stream = client_->OpenStream(gone, "echo_stream", CallOptions{Milliseconds(20000), true});
  auto written = Await(stream->Write(Message("anyone?")), kSettle);
  auto read = Await(stream->Read(), kSettle);
  EXPECT_FALSE(read.ok()) << "a stream to a node that shut down delivered something";
  if (!read.ok()) {
    EXPECT_EQ(read.status().code(), StatusCode::kUnavailable) << read.status().ToString();
  }
  EXPECT_FALSE(written.ok());
  EXPECT_LT(test::SecondsSince(start), 4.0 * test::kSlowdown);
  EXPECT_EQ(client_->direct_connections().idle, 0u);

  // The client is not hurt: a fresh server gets direct streams.
  auto fresh = StartNode(Options(GetParam()));
  ASSERT_NE(fresh, nullptr);
  fresh->RegisterStream("echo_stream", EchoStream);
  EXPECT_TRUE(DirectEchoWorks(*client_, *fresh, 5));
}

TEST_P(DirectReuseTest, AClientThatShutDownReleasesTheServersWaitingEnd) {
  ASSERT_TRUE(DirectEchoWorks(*client_, *server_, 1));
  ASSERT_TRUE(KeptBothEnds(1));
  client_->Shutdown();
  EXPECT_TRUE(WaitUntil([&] { return server_->direct_connections().served_idle == 0; }, kSettle));
}

TEST_P(DirectReuseTest, ZeroIdleTimeoutGivesEveryStreamAConnectionOfItsOwn) {
  NodeOptions client_options = Options(GetParam());
  client_options.direct_idle_timeout = Milliseconds(0);
  Start(Options(GetParam()), client_options);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(DirectEchoWorks(*client_, *server_, i));
  const DirectConnectionStats stats = client_->direct_connections();
  EXPECT_EQ(stats.dialed, 3u);
  EXPECT_EQ(stats.reused, 0u);
  EXPECT_EQ(stats.idle, 0u);
}

INSTANTIATE_TEST_SUITE_P(PlainAndSealed, DirectReuseTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "Encrypted" : "Plain";
                         });

}  // namespace
}  // namespace hivemind::net
