// Streams between nodes on loopback: both directions, half-close, errors, flow control,
// cancellation and the per-peer limit on inbound streams.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "net/node.h"
#include "test_util.h"

namespace hivemind::net {
namespace {

using test::Await;
using test::Clock;
using test::EchoStream;
using test::MakeMessage;
using test::Notification;
using test::ReadAll;
using test::SecondsSince;
using test::StartNode;
using test::TestNodeOptions;

constexpr Milliseconds kHandlerWait{10000};

class StreamTest : public ::testing::Test {
 protected:
  void SetUp() override { StartNodes(TestNodeOptions(), TestNodeOptions()); }

  void StartNodes(NodeOptions server_options, NodeOptions client_options) {
    server_ = StartNode(server_options);
    ASSERT_NE(server_, nullptr);
    client_ = StartNode(client_options);
    ASSERT_NE(client_, nullptr);
    server_->RegisterStream("echo_stream", EchoStream);
  }

  std::shared_ptr<Stream> Open(const std::string& method) {
    return client_->OpenStream(server_->visible_address(), method,
                               CallOptions{Milliseconds(20000)});
  }

  std::unique_ptr<Node> server_;
  std::unique_ptr<Node> client_;
};

TEST_F(StreamTest, ClientWritesAndReadsTheServersEchoes) {
  auto stream = Open("echo_stream");
  ASSERT_NE(stream, nullptr);
  EXPECT_EQ(stream->peer(), server_->peer_id());
  constexpr int kMessages = 50;
  std::vector<Future<Empty>> writes;
  for (int i = 0; i < kMessages; ++i) {
    writes.push_back(stream->Write(
        MakeMessage("m" + std::to_string(i), {test::PatternString(1000 + i, i), "tail"})));
  }
  for (int i = 0; i < kMessages; ++i) {
    auto next = Await(stream->Read());
    ASSERT_TRUE(next.ok()) << i << ": " << next.status().ToString();
    ASSERT_TRUE(next->has_value()) << i << ": stream ended early";
    const Message& message = **next;
    EXPECT_EQ(message.header, "m" + std::to_string(i));
    ASSERT_EQ(message.payloads.size(), 2u);
    EXPECT_EQ(message.payloads[0].ToString(), test::PatternString(1000 + i, i));
    EXPECT_EQ(message.payloads[1].ToString(), "tail");
  }
  for (auto& write : writes) EXPECT_TRUE(Await(write).ok());
  stream->CloseWrite();
  auto end = Await(stream->Read());
  ASSERT_TRUE(end.ok()) << end.status().ToString();
  EXPECT_FALSE(end->has_value());
}

TEST_F(StreamTest, ServerWritesWithoutTheClientWriting) {
  constexpr int kMessages = 40;  // more than the stream window
  server_->RegisterStream("countdown", [](const CallContext&, Stream& stream) {
    for (int i = 0; i < kMessages; ++i) {
      auto written = stream.Write(Message("s" + std::to_string(i))).WaitFor(kHandlerWait);
      if (!written || !written->ok()) return Status(StatusCode::kInternal, "write failed");
    }
    return Status::Ok();
  });
  auto stream = Open("countdown");
  auto messages = ReadAll(*stream);
  ASSERT_TRUE(messages.ok()) << messages.status().ToString();
  ASSERT_EQ(messages->size(), static_cast<size_t>(kMessages));
  for (int i = 0; i < kMessages; ++i) EXPECT_EQ((*messages)[i].header, "s" + std::to_string(i));
}

TEST_F(StreamTest, CloseWriteEndsTheServersReadsAndTheServerCanStillWrite) {
  server_->RegisterStream("count", [](const CallContext&, Stream& stream) {
    int count = 0;
    while (true) {
      auto next = stream.Read().WaitFor(kHandlerWait);
      if (!next || !next->ok()) return Status(StatusCode::kInternal, "read failed");
      if (!next->value().has_value()) break;
      ++count;
    }
    auto written = stream.Write(Message("count=" + std::to_string(count))).WaitFor(kHandlerWait);
    if (!written || !written->ok()) return Status(StatusCode::kInternal, "write failed");
    return Status::Ok();
  });
  auto stream = Open("count");
  for (int i = 0; i < 3; ++i) stream->Write(Message("x"));
  stream->CloseWrite();
  auto messages = ReadAll(*stream);
  ASSERT_TRUE(messages.ok()) << messages.status().ToString();
  ASSERT_EQ(messages->size(), 1u);
  EXPECT_EQ((*messages)[0].header, "count=3");
}

TEST_F(StreamTest, WriteAfterCloseWriteFails) {
  auto stream = Open("echo_stream");
  stream->CloseWrite();
  auto write = Await(stream->Write(Message("too late")));
  EXPECT_FALSE(write.ok());
  auto end = Await(stream->Read());
  ASSERT_TRUE(end.ok()) << end.status().ToString();
  EXPECT_FALSE(end->has_value());
}

TEST_F(StreamTest, ReadAfterTheEndKeepsReturningNullopt) {
  server_->RegisterStream("empty", [](const CallContext&, Stream&) { return Status::Ok(); });
  auto stream = Open("empty");
  for (int i = 0; i < 2; ++i) {
    auto end = Await(stream->Read());
    ASSERT_TRUE(end.ok()) << end.status().ToString();
    EXPECT_FALSE(end->has_value());
  }
}

TEST_F(StreamTest, HandlerErrorFailsTheClientsReadWithThatCode) {
  server_->RegisterStream("refuse", [](const CallContext&, Stream&) {
    return Status(StatusCode::kPermissionDenied, "this shard is not yours");
  });
  auto stream = Open("refuse");
  auto next = Await(stream->Read());
  ASSERT_FALSE(next.ok());
  EXPECT_EQ(next.status().code(), StatusCode::kPermissionDenied) << next.status().ToString();
  EXPECT_NE(next.status().message().find("this shard is not yours"), std::string::npos)
      << next.status().ToString();
}

TEST_F(StreamTest, MessagesWrittenBeforeAHandlerErrorAreStillDelivered) {
  server_->RegisterStream("partial", [](const CallContext&, Stream& stream) {
    auto written = stream.Write(Message("partial")).WaitFor(kHandlerWait);
    if (!written || !written->ok()) return Status(StatusCode::kInternal, "write failed");
    return Status(StatusCode::kResourceExhausted, "out of buffers");
  });
  auto stream = Open("partial");
  auto first = Await(stream->Read());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_TRUE(first->has_value());
  EXPECT_EQ((*first)->header, "partial");
  auto second = Await(stream->Read());
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kResourceExhausted) << second.status().ToString();
}

TEST_F(StreamTest, UnknownStreamMethodIsNotFound) {
  auto stream = Open("no_such_stream");
  auto next = Await(stream->Read());
  ASSERT_FALSE(next.ok());
  EXPECT_EQ(next.status().code(), StatusCode::kNotFound) << next.status().ToString();
}

TEST_F(StreamTest, StreamPastItsDeadlineFailsWithDeadlineExceeded) {
  auto release = std::make_shared<Notification>();
  server_->RegisterStream("silent", [release](const CallContext&, Stream&) {
    release->WaitFor(kHandlerWait);
    return Status::Ok();
  });
  auto stream =
      client_->OpenStream(server_->visible_address(), "silent", CallOptions{Milliseconds(500)});
  auto start = Clock::now();
  auto next = Await(stream->Read());
  double elapsed = SecondsSince(start);
  release->Notify();
  ASSERT_FALSE(next.ok());
  EXPECT_EQ(next.status().code(), StatusCode::kDeadlineExceeded) << next.status().ToString();
  EXPECT_LT(elapsed, 1.5);
}

TEST(StreamFlowControlTest, WritesBeyondTheWindowWaitForTheReader) {
  constexpr int kWindow = 4;
  constexpr int kExtra = 10;
  // Declared before the nodes: destroying a node joins the handler threads that use these.
  Notification start_reading;
  Notification handler_started;
  Promise<std::vector<std::string>> received;
  NodeOptions options = TestNodeOptions();
  options.stream_window_messages = kWindow;
  auto server = StartNode(options);
  auto client = StartNode(options);
  ASSERT_NE(server, nullptr);
  ASSERT_NE(client, nullptr);

  server->RegisterStream("slow_reader", [&](const CallContext&, Stream& stream) {
    handler_started.Notify();
    start_reading.WaitFor(kHandlerWait);
    auto messages = ReadAll(stream, kHandlerWait);
    if (!messages.ok()) {
      received.Set(messages.status());
      return messages.status();
    }
    std::vector<std::string> headers;
    for (const auto& message : *messages) headers.push_back(message.header);
    received.Set(std::move(headers));
    return Status::Ok();
  });

  auto stream = client->OpenStream(server->visible_address(), "slow_reader",
                                   CallOptions{Milliseconds(20000)});
  std::vector<Future<Empty>> writes;
  for (int i = 0; i < kWindow + kExtra; ++i) {
    writes.push_back(stream->Write(MakeMessage(std::to_string(i), {std::string(1000, 'w')})));
  }
  ASSERT_TRUE(handler_started.WaitFor(test::kPromptly));
  for (int i = 0; i < kWindow; ++i) {
    auto written = Await(writes[i], Milliseconds(3000));
    EXPECT_TRUE(written.ok()) << "write " << i << ": " << written.status().ToString();
  }
  // The reader has read nothing: the write just past the window must still be waiting.
  EXPECT_FALSE(writes[kWindow].WaitFor(Milliseconds(500)).has_value())
      << "a write beyond the stream window completed before the reader read anything";
  for (int i = kWindow; i < kWindow + kExtra; ++i) {
    EXPECT_FALSE(writes[i].IsReady()) << "write " << i << " completed past the window";
  }

  start_reading.Notify();
  for (int i = kWindow; i < kWindow + kExtra; ++i) {
    auto written = Await(writes[i], Milliseconds(5000));
    EXPECT_TRUE(written.ok()) << "write " << i << ": " << written.status().ToString();
  }
  stream->CloseWrite();
  auto headers = Await(received.future());
  ASSERT_TRUE(headers.ok()) << headers.status().ToString();
  ASSERT_EQ(headers->size(), static_cast<size_t>(kWindow + kExtra));
  for (int i = 0; i < kWindow + kExtra; ++i) EXPECT_EQ((*headers)[i], std::to_string(i));
  auto end = Await(stream->Read());
  ASSERT_TRUE(end.ok()) << end.status().ToString();
  EXPECT_FALSE(end->has_value());
}

TEST(StreamFlowControlTest, ServerWritesWaitForTheClientToRead) {
  constexpr int kWindow = 4;
  // Declared before the nodes: destroying a node joins the handler threads that use these.
  std::atomic<int> completed_writes{0};
  Notification blocked_write_seen;
  NodeOptions options = TestNodeOptions();
  options.stream_window_messages = kWindow;
  auto server = StartNode(options);
  auto client = StartNode(options);
  ASSERT_NE(server, nullptr);
  ASSERT_NE(client, nullptr);

  server->RegisterStream("fast_writer", [&](const CallContext&, Stream& stream) {
    for (int i = 0; i < 3 * kWindow; ++i) {
      auto write = stream.Write(Message(std::to_string(i)));
      if (!write.WaitFor(Milliseconds(300))) {
        blocked_write_seen.Notify();
        if (!write.WaitFor(kHandlerWait)) return Status(StatusCode::kInternal, "write stuck");
      }
      ++completed_writes;
    }
    return Status::Ok();
  });
  auto stream = client->OpenStream(server->visible_address(), "fast_writer",
                                   CallOptions{Milliseconds(20000)});
  ASSERT_TRUE(blocked_write_seen.WaitFor(test::kPromptly))
      << "the server wrote " << completed_writes.load() << " messages without the client reading";
  EXPECT_LE(completed_writes.load(), kWindow);
  auto messages = ReadAll(*stream);
  ASSERT_TRUE(messages.ok()) << messages.status().ToString();
  EXPECT_EQ(messages->size(), static_cast<size_t>(3 * kWindow));
}

TEST_F(StreamTest, ClientCancelFailsTheServersReadWithCancelled) {
  Promise<Empty> server_read;  // the outcome of the server's pending Read
  auto handler_started = std::make_shared<Notification>();
  server_->RegisterStream(
      "wait_for_input", [server_read, handler_started](const CallContext&, Stream& stream) {
        handler_started->Notify();
        auto next = stream.Read().WaitFor(kHandlerWait);
        if (!next) {
          server_read.Set(Status(StatusCode::kInternal, "the server's Read never completed"));
        } else if (!next->ok()) {
          server_read.Set(next->status());
        } else {
          server_read.Set(Empty{});
        }
        return Status::Ok();
      });
  auto stream = Open("wait_for_input");
  ASSERT_TRUE(handler_started->WaitFor(test::kPromptly));
  auto cancelled_at = Clock::now();
  stream->Cancel();
  auto read = Await(server_read.future(), Milliseconds(3000));
  ASSERT_FALSE(read.ok()) << "the server's Read succeeded after the client cancelled";
  EXPECT_EQ(read.status().code(), StatusCode::kCancelled) << read.status().ToString();
  EXPECT_LT(SecondsSince(cancelled_at), 2.0);

  auto own_read = Await(stream->Read(), Milliseconds(1000));
  ASSERT_FALSE(own_read.ok());
  EXPECT_EQ(own_read.status().code(), StatusCode::kCancelled) << own_read.status().ToString();
  auto own_write = Await(stream->Write(Message("late")), Milliseconds(1000));
  EXPECT_FALSE(own_write.ok());
}

TEST_F(StreamTest, ServerCancelFailsTheClientsReadWithCancelled) {
  server_->RegisterStream("abort", [](const CallContext&, Stream& stream) {
    stream.Cancel();
    return Status::Ok();
  });
  auto stream = Open("abort");
  auto next = Await(stream->Read());
  ASSERT_FALSE(next.ok());
  EXPECT_EQ(next.status().code(), StatusCode::kCancelled) << next.status().ToString();
}

TEST(StreamLimitTest, OpeningMoreInboundStreamsThanAllowedIsResourceExhausted) {
  NodeOptions server_options = TestNodeOptions();
  server_options.max_inbound_streams_per_peer = 2;
  auto server = StartNode(server_options);
  auto client = StartNode();
  ASSERT_NE(server, nullptr);
  ASSERT_NE(client, nullptr);
  server->RegisterStream("echo_stream", EchoStream);
  auto open = [&] {
    return client->OpenStream(server->visible_address(), "echo_stream",
                              CallOptions{Milliseconds(20000)});
  };
  auto roundtrip = [](Stream& stream, const std::string& text) -> Status {
    stream.Write(Message(text));
    auto next = Await(stream.Read());
    if (!next.ok()) return next.status();
    if (!next->has_value()) return Status(StatusCode::kInternal, "stream ended");
    if ((*next)->header != text) return Status(StatusCode::kInternal, "wrong echo");
    return Status::Ok();
  };

  auto first = open();
  auto second = open();
  ASSERT_TRUE(roundtrip(*first, "1").ok());
  ASSERT_TRUE(roundtrip(*second, "2").ok());

  auto third = open();
  auto refused = Await(third->Read());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status().ToString();

  Status again_first = roundtrip(*first, "1b");
  EXPECT_TRUE(again_first.ok()) << again_first.ToString();
  Status again_second = roundtrip(*second, "2b");
  EXPECT_TRUE(again_second.ok()) << again_second.ToString();
  for (auto* stream : {first.get(), second.get()}) {
    stream->CloseWrite();
    auto rest = ReadAll(*stream);
    ASSERT_TRUE(rest.ok()) << rest.status().ToString();
    EXPECT_TRUE(rest->empty());
  }
}

TEST_F(StreamTest, UnaryCallsAndStreamsShareTheConnection) {
  test::RegisterEcho(*server_);
  auto stream = Open("echo_stream");
  stream->Write(Message("s"));
  auto reply = Await(client_->Call(server_->visible_address(), "echo", Message("u")));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, "u");
  auto echoed = Await(stream->Read());
  ASSERT_TRUE(echoed.ok()) << echoed.status().ToString();
  ASSERT_TRUE(echoed->has_value());
  EXPECT_EQ((*echoed)->header, "s");
  EXPECT_EQ(client_->ConnectedPeers().size(), 1u);
  stream->CloseWrite();
  EXPECT_TRUE(ReadAll(*stream).ok());
}

TEST_F(StreamTest, ManyStreamsAtOnceStayApart) {
  constexpr int kStreams = 20;
  std::vector<std::shared_ptr<Stream>> streams;
  for (int s = 0; s < kStreams; ++s) {
    streams.push_back(Open("echo_stream"));
    for (int i = 0; i < 5; ++i)
      streams[s]->Write(Message(std::to_string(s) + ":" + std::to_string(i)));
    streams[s]->CloseWrite();
  }
  for (int s = 0; s < kStreams; ++s) {
    auto messages = ReadAll(*streams[s]);
    ASSERT_TRUE(messages.ok()) << s << ": " << messages.status().ToString();
    ASSERT_EQ(messages->size(), 5u);
    for (int i = 0; i < 5; ++i) {
      EXPECT_EQ((*messages)[i].header, std::to_string(s) + ":" + std::to_string(i));
    }
  }
}

}  // namespace
}  // namespace hivemind::net
