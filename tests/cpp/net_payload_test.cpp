// Large and chunked payloads: a 256 MiB transfer with bounded memory, payload sizes around the
// chunk size, and the size limits on messages and headers.
#include <gtest/gtest.h>

#include <cinttypes>
#include <cstdio>

#include "net/node.h"
#include "test_util.h"

namespace hivemind::net {
namespace {

using test::Await;
using test::MakeMessage;
using test::StartNode;
using test::TestNodeOptions;

constexpr size_t kMiB = size_t{1} << 20;

#if defined(__SANITIZE_ADDRESS__)
#define HIVEMIND_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HIVEMIND_TEST_ASAN 1
#endif
#endif
#ifdef HIVEMIND_TEST_ASAN
// AddressSanitizer's shadow memory and its quarantine of freed buffers count in the RSS too.
constexpr int64_t kSanitizerMemory = 512 * kMiB;
#else
constexpr int64_t kSanitizerMemory = 0;
#endif

// "<total payload bytes> <FNV-1a of all payload bytes in order>"
std::string Digest(const Message& message) {
  uint64_t hash = 14695981039346656037ull;
  for (const auto& payload : message.payloads)
    hash = test::Fnv1a(payload.data(), payload.size(), hash);
  char text[64];
  std::snprintf(text, sizeof(text), "%zu %016" PRIx64, message.PayloadBytes(), hash);
  return text;
}

void RegisterDigest(Node& node) {
  node.RegisterUnary("digest", [](const CallContext&, Message request, Responder respond) {
    respond(Message(Digest(request)));
  });
}

TEST(PayloadTest, Transfers256MiBIntactWithBoundedMemory) {
  constexpr size_t kSize = 256 * kMiB;
  auto server = StartNode();
  auto client = StartNode();
  ASSERT_NE(server, nullptr);
  ASSERT_NE(client, nullptr);
  RegisterDigest(*server);

  ASSERT_TRUE(test::ResetPeakRss()) << "cannot reset VmHWM through /proc/self/clear_refs";
  int64_t baseline = test::CurrentRssBytes();
  ASSERT_GT(baseline, 0);
  std::string expected;
  {
    Payload payload = Payload::Allocate(kSize);
    test::FillPattern(payload.mutable_data(), kSize, 42);
    Message request("big");
    request.payloads.push_back(payload);
    expected = Digest(request);

    auto reply = Await(client->Call(server->visible_address(), "digest", std::move(request),
                                    CallOptions{Milliseconds(60000)}),
                       Milliseconds(60000));
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    EXPECT_EQ(reply->header, expected);
  }
  int64_t growth = test::PeakRssBytes() - baseline;
  std::printf("peak RSS growth during a 256 MiB transfer: %.1f MiB\n",
              static_cast<double>(growth) / kMiB);
  // The sender's buffer and the receiver's copy are 512 MiB; queueing must not add another copy
  // per chunk in flight.
  EXPECT_LT(growth, static_cast<int64_t>(3 * kSize + 256 * kMiB) + kSanitizerMemory);
}

class ChunkedPayloadTest : public ::testing::Test {
 protected:
  static constexpr size_t kChunk = 64 * 1024;

  void SetUp() override {
    NodeOptions options = TestNodeOptions();
    options.chunk_bytes = kChunk;
    options.link_window_chunks = 2;
    server_ = StartNode(options);
    client_ = StartNode(options);
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(client_, nullptr);
    test::RegisterEcho(*server_);
  }

  std::unique_ptr<Node> server_;
  std::unique_ptr<Node> client_;
};

TEST_F(ChunkedPayloadTest, OddSizesArriveIntactOneByOne) {
  for (size_t size : {size_t{0}, size_t{1}, kChunk - 1, kChunk, kChunk + 1, 3 * kChunk + 7}) {
    std::string bytes = test::PatternString(size, size);
    auto reply = Await(client_->Call(server_->visible_address(), "echo",
                                     MakeMessage("size " + std::to_string(size), {bytes})));
    ASSERT_TRUE(reply.ok()) << size << ": " << reply.status().ToString();
    EXPECT_EQ(reply->header, "size " + std::to_string(size));
    ASSERT_EQ(reply->payloads.size(), 1u) << size;
    EXPECT_EQ(reply->payloads[0].size(), size);
    EXPECT_TRUE(reply->payloads[0].ToString() == bytes)
        << "payload of " << size << " bytes differs";
  }
}

TEST_F(ChunkedPayloadTest, OddSizesArriveIntactInOneMessage) {
  std::vector<std::string> payloads;
  for (size_t size : {size_t{0}, size_t{1}, kChunk - 1, kChunk, size_t{0}, kChunk + 1,
                      3 * kChunk + 7, size_t{1}}) {
    payloads.push_back(test::PatternString(size, payloads.size() + 100));
  }
  auto reply =
      Await(client_->Call(server_->visible_address(), "echo", MakeMessage("many", payloads)));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  ASSERT_EQ(reply->payloads.size(), payloads.size());
  for (size_t i = 0; i < payloads.size(); ++i) {
    EXPECT_EQ(reply->payloads[i].size(), payloads[i].size()) << i;
    EXPECT_TRUE(reply->payloads[i].ToString() == payloads[i]) << "payload " << i << " differs";
  }
}

TEST_F(ChunkedPayloadTest, ConcurrentChunkedCallsDoNotMix) {
  std::vector<std::string> payloads;
  std::vector<Future<Message>> futures;
  for (int i = 0; i < 8; ++i) {
    payloads.push_back(test::PatternString(5 * kChunk + 13 * i, 1000 + i));
    futures.push_back(client_->Call(server_->visible_address(), "echo",
                                    MakeMessage(std::to_string(i), {payloads.back()})));
  }
  for (int i = 0; i < 8; ++i) {
    auto reply = Await(futures[i]);
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    EXPECT_EQ(reply->header, std::to_string(i));
    ASSERT_EQ(reply->payloads.size(), 1u);
    EXPECT_TRUE(reply->payloads[0].ToString() == payloads[i]) << "payload " << i << " differs";
  }
}

TEST_F(ChunkedPayloadTest, ChunkedStreamMessagesArriveIntact) {
  server_->RegisterStream("echo_stream", [](const CallContext&, Stream& stream) {
    while (true) {
      auto next = stream.Read().WaitFor(Milliseconds(10000));
      if (!next || !next->ok()) return Status(StatusCode::kInternal, "read failed");
      if (!next->value().has_value()) return Status::Ok();
      auto written = stream.Write(std::move(*next->value())).WaitFor(Milliseconds(10000));
      if (!written || !written->ok()) return Status(StatusCode::kInternal, "write failed");
    }
  });
  auto stream = client_->OpenStream(server_->visible_address(), "echo_stream");
  std::vector<std::string> sent;
  for (size_t size : {kChunk - 1, kChunk + 1, 4 * kChunk}) {
    sent.push_back(test::PatternString(size, size));
    stream->Write(MakeMessage("s", {sent.back()}));
  }
  stream->CloseWrite();
  for (const auto& bytes : sent) {
    auto next = Await(stream->Read());
    ASSERT_TRUE(next.ok()) << next.status().ToString();
    ASSERT_TRUE(next->has_value());
    ASSERT_EQ((*next)->payloads.size(), 1u);
    EXPECT_TRUE((*next)->payloads[0].ToString() == bytes) << bytes.size() << " bytes differ";
  }
  auto end = Await(stream->Read());
  ASSERT_TRUE(end.ok()) << end.status().ToString();
  EXPECT_FALSE(end->has_value());
}

class LimitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    NodeOptions server_options = TestNodeOptions();
    server_options.max_message_bytes = 1 * kMiB;
    server_options.max_header_bytes = 4096;
    server_options.chunk_bytes = 256 * 1024;
    server_ = StartNode(server_options);
    NodeOptions client_options = TestNodeOptions();
    client_options.chunk_bytes = 256 * 1024;
    client_ = StartNode(client_options);
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(client_, nullptr);
    test::RegisterEcho(*server_);
    handled_ = std::make_shared<std::atomic<int>>(0);
    server_->RegisterUnary("count",
                           [handled = handled_](const CallContext&, Message, Responder respond) {
                             ++*handled;
                             respond(Message("served"));
                           });
  }

  // Sends `request` to "count" (which answers "served"): it must be refused without reaching the
  // handler, and a normal echo on the same connection must work afterwards.
  void ExpectRefusedThenConnectionStillServes(Message request) {
    uint16_t port = server_->visible_address().endpoints.at(0).port;
    ASSERT_TRUE(Await(client_->Call(server_->visible_address(), "echo", Message("warm up"))).ok());
    auto refused = Await(client_->Call(server_->visible_address(), "count", std::move(request),
                                       CallOptions{Milliseconds(5000)}),
                         Milliseconds(8000));
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted)
        << refused.status().ToString();
    EXPECT_EQ(handled_->load(), 0) << "the handler saw a message above the limit";

    auto normal = Await(client_->Call(server_->visible_address(), "echo",
                                      MakeMessage("normal", {std::string(1000, 'n')})));
    ASSERT_TRUE(normal.ok()) << normal.status().ToString();
    EXPECT_EQ(normal->header, "normal");
    EXPECT_EQ(test::CountEstablishedConnectionsToPort(port), 1)
        << "the refusal should not have cost the connection";
  }

  std::unique_ptr<Node> server_;
  std::unique_ptr<Node> client_;
  std::shared_ptr<std::atomic<int>> handled_;
};

TEST_F(LimitTest, MessageAboveTheReceiversMaxMessageBytesIsResourceExhausted) {
  ExpectRefusedThenConnectionStillServes(MakeMessage("big", {std::string(2 * kMiB, 'b')}));
}

TEST_F(LimitTest, MessageJustAboveTheLimitIsRefusedAndJustBelowIsServed) {
  Message below = MakeMessage("", {std::string(kMiB - 1024, 'x')});
  auto served = Await(client_->Call(server_->visible_address(), "echo", std::move(below)));
  EXPECT_TRUE(served.ok()) << served.status().ToString();
  ExpectRefusedThenConnectionStillServes(MakeMessage("", {std::string(kMiB + 1, 'x')}));
}

TEST_F(LimitTest, HeaderAboveTheReceiversMaxHeaderBytesIsResourceExhausted) {
  ExpectRefusedThenConnectionStillServes(Message(std::string(64 * 1024, 'h')));
}

TEST_F(LimitTest, HeaderSlightlyAboveTheReceiversMaxHeaderBytesIsResourceExhausted) {
  ExpectRefusedThenConnectionStillServes(Message(std::string(4096 + 100, 'h')));
}

TEST_F(LimitTest, SenderRefusesToSendAboveItsOwnLimit) {
  auto reply = Await(server_->Call(client_->visible_address(), "anything",
                                   MakeMessage("", {std::string(2 * kMiB, 'b')})));
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kResourceExhausted) << reply.status().ToString();
  auto header =
      Await(server_->Call(client_->visible_address(), "anything", Message(std::string(8192, 'h'))));
  ASSERT_FALSE(header.ok());
  EXPECT_EQ(header.status().code(), StatusCode::kResourceExhausted) << header.status().ToString();
}

TEST_F(LimitTest, ReplyAboveTheCallersLimitFailsTheCall) {
  client_->RegisterUnary("huge_reply", [](const CallContext&, Message, Responder respond) {
    respond(MakeMessage("", {std::string(2 * kMiB, 'r')}));
  });
  auto reply = Await(server_->Call(client_->visible_address(), "huge_reply", Message("q")));
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kResourceExhausted) << reply.status().ToString();
  auto normal = Await(server_->Call(client_->visible_address(), "nothing", Message("q")));
  EXPECT_EQ(normal.status().code(), StatusCode::kNotFound) << normal.status().ToString();
}

TEST_F(LimitTest, StreamWriteAboveTheLimitFails) {
  server_->RegisterStream("sink", [](const CallContext&, Stream& stream) {
    while (true) {
      auto next = stream.Read().WaitFor(Milliseconds(10000));
      if (!next || !next->ok() || !next->value().has_value()) return Status::Ok();
    }
  });
  auto stream = client_->OpenStream(server_->visible_address(), "sink");
  auto write = Await(stream->Write(MakeMessage("", {std::string(2 * kMiB, 'w')})));
  auto read = Await(stream->Read(), Milliseconds(8000));
  // Either the receiver refuses the message, failing the stream, or the writer is told at once.
  EXPECT_TRUE(!write.ok() || !read.ok());
  if (!read.ok()) {
    EXPECT_EQ(read.status().code(), StatusCode::kResourceExhausted) << read.status().ToString();
  }
}

}  // namespace
}  // namespace hivemind::net
