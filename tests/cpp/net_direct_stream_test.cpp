// Direct streams (CallOptions::direct): streams on a TCP connection of their own keep the semantics
// of ordinary streams, fall back to ordinary ones when they cannot be set up, and survive rogues.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "net/direct_cipher.h"
#include "net/direct_io.h"
#include "net/node.h"
#include "proto/transport.pb.h"
#include "test_util.h"

namespace hivemind::net {
namespace {

using test::Await;
using test::Clock;
using test::EchoStream;
using test::MakeMessage;
using test::Notification;
using test::PatternString;
using test::ReadAll;
using test::SecondsSince;
using test::StartNode;
using test::TestNodeOptions;

constexpr Milliseconds kHandlerWait{10000};
// How long a rogue connection waits for the node to refuse it or close it.
constexpr Milliseconds kRefusalWait{3000 * test::kSlowdown};
constexpr size_t kMiB = size_t{1} << 20;

// Options for a node that serves and opens direct streams: those need encryption off on both nodes.
NodeOptions DirectOptions() {
  NodeOptions options = TestNodeOptions();
  options.encryption = false;
  return options;
}

CallOptions Direct(Milliseconds timeout = Milliseconds(20000)) {
  return CallOptions{timeout, true};
}

bool IsCancelledOrUnavailable(StatusCode code) {
  return code == StatusCode::kCancelled || code == StatusCode::kUnavailable;
}

// A message to send, kept as strings so that what comes back can be compared with it.
struct Sample {
  std::string header;
  std::vector<std::string> payloads;

  Message ToMessage() const { return MakeMessage(header, payloads); }
};

// Why `got` differs from `want`, or "" when it does not. Megabyte strings are not printed.
std::string Difference(const Message& got, const Sample& want) {
  if (got.header != want.header) {
    return "a header of " + std::to_string(got.header.size()) + " bytes instead of the " +
           std::to_string(want.header.size()) + " sent";
  }
  if (got.payloads.size() != want.payloads.size()) {
    return std::to_string(got.payloads.size()) + " payloads instead of " +
           std::to_string(want.payloads.size());
  }
  for (size_t j = 0; j < want.payloads.size(); ++j) {
    const Payload& payload = got.payloads[j];
    const std::string& bytes = want.payloads[j];
    if (payload.size() != bytes.size()) {
      return "payload " + std::to_string(j) + " has " + std::to_string(payload.size()) +
             " bytes instead of " + std::to_string(bytes.size());
    }
    if (!bytes.empty() && std::memcmp(payload.data(), bytes.data(), bytes.size()) != 0) {
      return "payload " + std::to_string(j) + " has other bytes than those sent";
    }
  }
  return "";
}

// Writes a few small messages on a stream to "echo_stream", closes its writes, and checks that the
// same messages come back, then the end of the stream.
::testing::AssertionResult EchoWorks(Stream& stream) {
  const std::vector<Sample> samples = {
      {"a", {}}, {"b", {PatternString(100000, 7)}}, {"", {"", "c"}}};
  std::vector<Future<Empty>> writes;
  for (const auto& sample : samples) writes.push_back(stream.Write(sample.ToMessage()));
  stream.CloseWrite();
  auto messages = ReadAll(stream);
  if (!messages.ok()) {
    return ::testing::AssertionFailure() << "the echo failed: " << messages.status().ToString();
  }
  if (messages->size() != samples.size()) {
    return ::testing::AssertionFailure()
           << "got " << messages->size() << " echoes of " << samples.size() << " messages";
  }
  for (size_t i = 0; i < samples.size(); ++i) {
    std::string difference = Difference((*messages)[i], samples[i]);
    if (!difference.empty()) {
      return ::testing::AssertionFailure() << "echo " << i << ": " << difference;
    }
  }
  for (auto& write : writes) {
    auto written = Await(write);
    if (!written.ok()) {
      return ::testing::AssertionFailure() << "a write failed: " << written.status().ToString();
    }
  }
  return ::testing::AssertionSuccess();
}

// What a Hold handler saw: whether its stream was direct, whether a message came, and how its
// reads ended (the status that failed a Read; Empty when the client closed its writes).
struct HoldState {
  std::atomic<int> direct{-1};  // -1 until the handler starts
  Notification started;
  Notification got_message;
  Promise<Empty> reads_ended;
};

// A handler that never writes and reads until its stream ends, so that only the stream's end
// (a failure, normally) makes it return.
StreamHandler Hold(std::shared_ptr<HoldState> state) {
  return [state](const CallContext&, Stream& stream) -> Status {
    state->direct = stream.direct() ? 1 : 0;
    state->started.Notify();
    while (true) {
      auto next = stream.Read().WaitFor(kHandlerWait);
      if (!next) {
        Status stuck(StatusCode::kInternal, "TEST: a Read in the handler did not complete");
        state->reads_ended.Set(stuck);
        return stuck;
      }
      if (!next->ok()) {
        state->reads_ended.Set(next->status());
        return next->status();
      }
      if (!next->value().has_value()) {
        state->reads_ended.Set(Empty{});
        return Status::Ok();
      }
      state->got_message.Notify();
    }
  };
}

class DirectStreamTest : public ::testing::Test {
 protected:
  void SetUp() override { StartNodes(DirectOptions(), DirectOptions()); }

  // (Re)starts both nodes; the server serves "echo_stream" and counts the handlers it ran.
  void StartNodes(NodeOptions server_options, NodeOptions client_options) {
    client_.reset();
    server_.reset();
    echo_handlers_ = 0;
    direct_echo_handlers_ = 0;
    server_ = StartNode(server_options);
    ASSERT_NE(server_, nullptr);
    client_ = StartNode(client_options);
    ASSERT_NE(client_, nullptr);
    server_->RegisterStream("echo_stream", [this](const CallContext& context, Stream& stream) {
      ++echo_handlers_;
      if (stream.direct()) ++direct_echo_handlers_;
      return EchoStream(context, stream);
    });
  }

  std::shared_ptr<Stream> OpenDirect(const std::string& method,
                                     Milliseconds timeout = Milliseconds(20000)) {
    return client_->OpenStream(server_->visible_address(), method, Direct(timeout));
  }

  // The server's offer of a direct connection, asked for the way a caller does before connecting.
  Result<wire::DirectOffer> AskForOffer() {
    auto reply = Await(client_->Call(server_->visible_address(), "net.v1.direct", Message()));
    if (!reply.ok()) return reply.status();
    wire::DirectOffer offer;
    if (!offer.ParseFromString(reply->header)) {
      return Status(StatusCode::kInternal, "TEST: the offer is not a DirectOffer");
    }
    if (offer.port() == 0 || offer.port() > 65535) {
      return Status(StatusCode::kInternal,
                    "TEST: the offer names port " + std::to_string(offer.port()));
    }
    return offer;
  }

  void ExpectServerStillServesDirectStreams() {
    auto stream = OpenDirect("echo_stream");
    EXPECT_TRUE(EchoWorks(*stream));
    EXPECT_TRUE(stream->direct());
  }

  // Declared before the nodes: destroying a node joins the handler threads that use these.
  std::atomic<int> echo_handlers_{0};
  std::atomic<int> direct_echo_handlers_{0};
  std::unique_ptr<Node> server_;
  std::unique_ptr<Node> client_;
};

TEST_F(DirectStreamTest, EchoesMessagesOfEveryShapeInOrder) {
  std::vector<Sample> samples = {
      {"", {}},  // an empty message is still a message, not the end of the stream
      {"one empty payload", {""}},
      {"one byte", {"\x07"}},
      {"1 MiB", {PatternString(kMiB, 3)}},
      {"5 MiB", {PatternString(5 * kMiB, 4)}},
      {"several", {"", "abc", PatternString(70000, 5), "", PatternString(kMiB, 6)}},
      {PatternString(32 << 10, 7), {"after a 32 KiB binary header"}},
  };
  for (int i = static_cast<int>(samples.size()); i < 50; ++i) {
    samples.push_back({"m" + std::to_string(i), {PatternString(1000 + i, i)}});
  }
  auto stream = OpenDirect("echo_stream");
  ASSERT_NE(stream, nullptr);
  EXPECT_EQ(stream->peer(), server_->peer_id());
  std::vector<Future<Empty>> writes;
  for (const auto& sample : samples) writes.push_back(stream->Write(sample.ToMessage()));
  stream->CloseWrite();
  for (size_t i = 0; i < samples.size(); ++i) {
    auto next = Await(stream->Read());
    ASSERT_TRUE(next.ok()) << i << ": " << next.status().ToString();
    ASSERT_TRUE(next->has_value()) << i << ": the stream ended early";
    EXPECT_EQ(Difference(**next, samples[i]), "") << "message " << i;
    if (i == 0) {
      EXPECT_TRUE(stream->direct()) << "the first read completed on an ordinary stream";
    }
  }
  for (size_t i = 0; i < writes.size(); ++i) {
    auto written = Await(writes[i]);
    EXPECT_TRUE(written.ok()) << "write " << i << ": " << written.status().ToString();
  }
  auto end = Await(stream->Read());
  ASSERT_TRUE(end.ok()) << end.status().ToString();
  EXPECT_FALSE(end->has_value());
  EXPECT_TRUE(stream->direct());
  EXPECT_EQ(echo_handlers_.load(), 1);
  EXPECT_EQ(direct_echo_handlers_.load(), 1) << "the handler's stream was not direct";
}

constexpr int kBulkMessages = 64;

std::vector<uint64_t> BulkHashes(uint64_t first_seed) {
  std::vector<uint64_t> hashes;
  for (int i = 0; i < kBulkMessages; ++i) {
    std::string bytes = PatternString(kMiB, first_seed + i);
    hashes.push_back(test::Fnv1a(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  }
  return hashes;
}

// Reads kBulkMessages messages named prefix + index, then the end of the stream; their hashes.
Result<std::vector<uint64_t>> ReadBulk(Stream& stream, const std::string& prefix,
                                       Milliseconds timeout) {
  std::vector<uint64_t> hashes;
  while (true) {
    auto next = stream.Read().WaitFor(timeout);
    if (!next) return Status(StatusCode::kInternal, "TEST: a Read did not complete in time");
    if (!next->ok()) return next->status();
    if (!next->value().has_value()) break;
    const Message& message = *next->value();
    std::string name = prefix + std::to_string(hashes.size());
    if (message.header != name || message.payloads.size() != 1) {
      return Status(StatusCode::kInternal, "TEST: expected " + name + ", got " + message.header);
    }
    const Payload& payload = message.payloads[0];
    hashes.push_back(test::Fnv1a(payload.data(), payload.size()));
  }
  return hashes;
}

// Writes kBulkMessages messages of 1 MiB named prefix + index, one after the other. It does not
// close the stream's writes: for a handler, that would tell the caller the handler is done.
Status WriteBulk(Stream& stream, const std::string& prefix, uint64_t first_seed,
                 Milliseconds timeout) {
  for (int i = 0; i < kBulkMessages; ++i) {
    auto written =
        stream.Write(MakeMessage(prefix + std::to_string(i), {PatternString(kMiB, first_seed + i)}))
            .WaitFor(timeout);
    if (!written) return Status(StatusCode::kInternal, "TEST: a Write did not complete in time");
    if (!written->ok()) return written->status();
  }
  return Status::Ok();
}

TEST_F(DirectStreamTest, BothDirectionsCarryLargeVolumesAtOnce) {
  // Both sides write 64 MiB while reading the other's 64 MiB, so both directions of the connection
  // are full at once: a transport that waits for its reader before it reads would deadlock.
  constexpr uint64_t kClientSeed = 100;
  constexpr uint64_t kServerSeed = 1000;
  Promise<std::vector<uint64_t>> server_received;
  auto handler_direct = std::make_shared<std::atomic<int>>(-1);
  server_->RegisterStream(
      "exchange", [server_received, handler_direct](const CallContext&, Stream& stream) {
        handler_direct->store(stream.direct() ? 1 : 0);
        Status written;
        std::thread writer([&] { written = WriteBulk(stream, "s", kServerSeed, kHandlerWait); });
        auto hashes = ReadBulk(stream, "c", kHandlerWait);
        writer.join();  // returning ends the server's writes, so the client reads its end last
        server_received.Set(hashes);
        if (!hashes.ok()) return hashes.status();
        return written;
      });
  auto expected_from_client = BulkHashes(kClientSeed);
  auto expected_from_server = BulkHashes(kServerSeed);

  auto stream = OpenDirect("exchange");
  Status client_written;
  std::thread writer([&] {
    client_written = WriteBulk(*stream, "c", kClientSeed, kHandlerWait);
    stream->CloseWrite();
  });
  auto client_received = ReadBulk(*stream, "s", kHandlerWait);
  writer.join();
  EXPECT_TRUE(client_written.ok()) << client_written.ToString();
  ASSERT_TRUE(client_received.ok()) << client_received.status().ToString();
  EXPECT_TRUE(*client_received == expected_from_server)
      << "the client got " << client_received->size() << " messages, not all as sent";
  auto received = Await(server_received.future(), kHandlerWait);
  ASSERT_TRUE(received.ok()) << received.status().ToString();
  EXPECT_TRUE(*received == expected_from_client)
      << "the server got " << received->size() << " messages, not all as sent";
  EXPECT_TRUE(stream->direct());
  EXPECT_EQ(handler_direct->load(), 1);
}

TEST_F(DirectStreamTest, HandlerErrorReachesTheClientWithItsCodeAndMessage) {
  auto handler_direct = std::make_shared<std::atomic<int>>(-1);
  server_->RegisterStream("refuse", [handler_direct](const CallContext&, Stream& stream) {
    handler_direct->store(stream.direct() ? 1 : 0);
    return Status(StatusCode::kPermissionDenied, "no entry for you");
  });
  auto stream = OpenDirect("refuse");
  auto next = Await(stream->Read());
  ASSERT_FALSE(next.ok());
  EXPECT_EQ(next.status().code(), StatusCode::kPermissionDenied) << next.status().ToString();
  EXPECT_NE(next.status().message().find("no entry for you"), std::string::npos)
      << next.status().ToString();
  EXPECT_EQ(handler_direct->load(), 1) << "the handler's stream was not direct";
}

TEST_F(DirectStreamTest, MessagesWrittenBeforeAHandlerErrorAreStillDelivered) {
  server_->RegisterStream("partial", [](const CallContext&, Stream& stream) {
    auto written =
        stream.Write(MakeMessage("partial", {PatternString(kMiB, 9)})).WaitFor(kHandlerWait);
    if (!written || !written->ok()) return Status(StatusCode::kInternal, "write failed");
    return Status(StatusCode::kResourceExhausted, "out of buffers");
  });
  auto stream = OpenDirect("partial");
  auto first = Await(stream->Read());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_TRUE(first->has_value());
  EXPECT_EQ(Difference(**first, {"partial", {PatternString(kMiB, 9)}}), "");
  EXPECT_TRUE(stream->direct());
  auto second = Await(stream->Read());
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kResourceExhausted) << second.status().ToString();
  EXPECT_NE(second.status().message().find("out of buffers"), std::string::npos)
      << second.status().ToString();
}

TEST_F(DirectStreamTest, UnknownMethodIsNotFound) {
  auto stream = OpenDirect("no_such_stream");
  auto next = Await(stream->Read());
  ASSERT_FALSE(next.ok());
  EXPECT_EQ(next.status().code(), StatusCode::kNotFound) << next.status().ToString();
  ExpectServerStillServesDirectStreams();
}

// Whether a stream asked for as direct to "echo_stream" works and ran the ordinary way.
// The counters are read after the echo, once its handler has run.
::testing::AssertionResult RanAsAnOrdinaryStream(
    Stream& stream, const std::atomic<int>& echo_handler_count,
    const std::atomic<int>& direct_echo_handler_count) {
  if (auto echoed = EchoWorks(stream); !echoed) return echoed;
  const int echo_handlers = echo_handler_count.load();
  const int direct_echo_handlers = direct_echo_handler_count.load();
  if (stream.direct()) return ::testing::AssertionFailure() << "the stream went direct";
  if (echo_handlers != 1 || direct_echo_handlers != 0) {
    return ::testing::AssertionFailure()
           << echo_handlers << " echo handlers ran, " << direct_echo_handlers << " of them direct";
  }
  return ::testing::AssertionSuccess();
}

TEST_F(DirectStreamTest, ServerWithoutDirectStreamsServesAnOrdinaryStream) {
  NodeOptions server_options = DirectOptions();
  server_options.direct_streams = false;
  StartNodes(server_options, DirectOptions());
  // Such a server answers the request for an offer with an error, which is what makes callers
  // fall back.
  auto offer = Await(client_->Call(server_->visible_address(), "net.v1.direct", Message()));
  EXPECT_FALSE(offer.ok()) << "a server without direct streams made an offer";
  auto stream = OpenDirect("echo_stream");
  EXPECT_TRUE(RanAsAnOrdinaryStream(*stream, echo_handlers_, direct_echo_handlers_));
}

TEST_F(DirectStreamTest, ClientWithoutDirectStreamsOpensAnOrdinaryStream) {
  NodeOptions client_options = DirectOptions();
  client_options.direct_streams = false;
  StartNodes(DirectOptions(), client_options);
  auto stream = OpenDirect("echo_stream");
  EXPECT_TRUE(RanAsAnOrdinaryStream(*stream, echo_handlers_, direct_echo_handlers_));
}

// With encryption the offer carries a key (over the CURVE link) and every byte after the hello is
// sealed: messages of several records each come back intact, and nothing readable is on the wire.
TEST_F(DirectStreamTest, EncryptedNodesRunSealedDirectStreams) {
  StartNodes(TestNodeOptions(), TestNodeOptions());  // encryption on, direct_streams left on
  auto offer = AskForOffer();
  ASSERT_TRUE(offer.ok()) << offer.status().ToString();
  EXPECT_EQ(offer->key().size(), DirectCipher::kKeyBytes);
  EXPECT_NE(offer->cipher(), wire::DIRECT_PLAIN);
  auto stream = OpenDirect("echo_stream");
  // 2.5 records, an empty payload, and a record boundary exactly at the end.
  const std::vector<Sample> samples = {{"header in the clear?", {PatternString(5 * kMiB / 2, 9)}},
                                       {"", {""}},
                                       {"exact", {PatternString(DirectCipher::kRecordBytes, 10)}}};
  for (const auto& sample : samples) ASSERT_TRUE(Await(stream->Write(sample.ToMessage())).ok());
  stream->CloseWrite();
  auto echoed = ReadAll(*stream);
  ASSERT_TRUE(echoed.ok()) << echoed.status().ToString();
  ASSERT_EQ(echoed->size(), samples.size());
  for (size_t i = 0; i < samples.size(); ++i) {
    EXPECT_EQ(Difference((*echoed)[i], samples[i]), "") << "message " << i;
  }
  EXPECT_TRUE(stream->direct());
  EXPECT_EQ(direct_echo_handlers_.load(), 1);
}

// Records open only once, in order, under their key, in the direction they were sealed.
TEST(DirectCipherTest, RecordsOpenOnlyAsSealed) {
  std::vector<wire::DirectCipherKind> kinds = {wire::DIRECT_CHACHA20POLY1305};
  if (DirectCipher::AesAvailable()) kinds.push_back(wire::DIRECT_AES256GCM);
  for (auto kind : kinds) {
    SCOPED_TRACE(wire::DirectCipherKind_Name(kind));
    const std::string key = DirectCipher::NewKey();
    const std::string plain = PatternString(3000, 1);
    auto sealed_record = [](DirectCipher& cipher, const std::string& text) {
      std::string record(text.size() + DirectCipher::kTagBytes, '\0');
      auto* out = reinterpret_cast<uint8_t*>(record.data());
      cipher.Seal(reinterpret_cast<const uint8_t*>(text.data()), text.size(), out,
                  out + text.size());
      return record;
    };
    auto open = [](DirectCipher& cipher, std::string record) {
      const size_t size = record.size() - DirectCipher::kTagBytes;
      auto* data = reinterpret_cast<uint8_t*>(record.data());
      if (!cipher.Open(data, size, data + size)) return std::string("<refused>");
      return record.substr(0, size);
    };
    DirectCipher caller(kind, key, /*caller=*/true);
    DirectCipher callee(kind, key, /*caller=*/false);
    std::string first = sealed_record(caller, plain);
    std::string second = sealed_record(caller, plain);
    EXPECT_EQ(first.find(plain.substr(0, 64)), std::string::npos) << "the record is not sealed";
    EXPECT_NE(first, second) << "two records under one nonce";
    EXPECT_EQ(open(callee, first), plain);
    EXPECT_EQ(open(callee, first), "<refused>") << "a replayed record opened";
    // That failed attempt used up the second record's number: a receiver gives up on a stream
    // at the first record that does not open, so this only checks that nothing opens twice.
    DirectCipher fresh(kind, key, /*caller=*/false);
    EXPECT_EQ(open(fresh, second), "<refused>") << "a record opened out of order";

    DirectCipher sender(kind, key, true), receiver(kind, key, false);
    std::string altered = sealed_record(sender, plain);
    altered[10] ^= 1;
    EXPECT_EQ(open(receiver, altered), "<refused>") << "an altered record opened";
    DirectCipher other_key(kind, DirectCipher::NewKey(), false);
    DirectCipher sender2(kind, key, true);
    EXPECT_EQ(open(other_key, sealed_record(sender2, plain)), "<refused>");
    // A record sealed by the callee cannot be passed off as the caller's (nor reflected back).
    DirectCipher callee2(kind, key, false), callee3(kind, key, false);
    EXPECT_EQ(open(callee3, sealed_record(callee2, plain)), "<refused>");
  }
}

TEST_F(DirectStreamTest, StreamPastItsDeadlineFailsWithDeadlineExceeded) {
  auto state = std::make_shared<HoldState>();
  server_->RegisterStream("hold", Hold(state));
  auto start = Clock::now();
  auto stream = OpenDirect("hold", Milliseconds(300 * test::kSlowdown));
  auto next = Await(stream->Read(), Milliseconds(5000 * test::kSlowdown));
  double elapsed = SecondsSince(start);
  ASSERT_FALSE(next.ok());
  EXPECT_EQ(next.status().code(), StatusCode::kDeadlineExceeded) << next.status().ToString();
  EXPECT_GE(elapsed, 0.25 * test::kSlowdown) << "the stream failed before its deadline";
  EXPECT_LT(elapsed, 5.0 * test::kSlowdown);
  ASSERT_TRUE(state->started.WaitFor(test::kPromptly));
  EXPECT_EQ(state->direct.load(), 1) << "the handler's stream was not direct";
  // The handler is not left waiting on a stream its caller gave up on.
  auto handler_reads = Await(state->reads_ended.future());
  EXPECT_FALSE(handler_reads.ok()) << "the handler's reads ended with OK after the deadline";
}

TEST_F(DirectStreamTest, ClientCancelFailsTheServersRead) {
  auto state = std::make_shared<HoldState>();
  server_->RegisterStream("hold", Hold(state));
  auto stream = OpenDirect("hold");
  auto written = Await(stream->Write(Message("first")));
  ASSERT_TRUE(written.ok()) << written.status().ToString();
  EXPECT_TRUE(stream->direct());
  ASSERT_TRUE(state->got_message.WaitFor(test::kPromptly));
  EXPECT_EQ(state->direct.load(), 1) << "the handler's stream was not direct";

  auto cancelled_at = Clock::now();
  stream->Cancel();
  auto read = Await(state->reads_ended.future(), Milliseconds(3000 * test::kSlowdown));
  ASSERT_FALSE(read.ok()) << "the server's Read succeeded after the client cancelled";
  EXPECT_PRED1(IsCancelledOrUnavailable, read.status().code()) << read.status().ToString();
  EXPECT_LT(SecondsSince(cancelled_at), 2.0 * test::kSlowdown);

  auto own_read = Await(stream->Read(), Milliseconds(1000));
  ASSERT_FALSE(own_read.ok());
  EXPECT_EQ(own_read.status().code(), StatusCode::kCancelled) << own_read.status().ToString();
  auto own_write = Await(stream->Write(Message("late")), Milliseconds(1000));
  ASSERT_FALSE(own_write.ok());
  EXPECT_EQ(own_write.status().code(), StatusCode::kCancelled) << own_write.status().ToString();
  ExpectServerStillServesDirectStreams();
}

TEST_F(DirectStreamTest, ServerShutdownFailsTheClientsPendingRead) {
  auto state = std::make_shared<HoldState>();
  server_->RegisterStream("hold", Hold(state));
  auto stream = OpenDirect("hold");
  ASSERT_TRUE(Await(stream->Write(Message("first"))).ok());
  ASSERT_TRUE(state->got_message.WaitFor(test::kPromptly));
  EXPECT_EQ(state->direct.load(), 1) << "the handler's stream was not direct";
  auto pending = stream->Read();

  // On a thread of its own, so that a Shutdown that hangs shows up as a failure, not a hang here
  // (it still has to return for the test to end).
  Notification shut_down;
  std::thread shutdown([&] {
    server_->Shutdown();
    shut_down.Notify();
  });
  auto read = Await(pending, Milliseconds(5000 * test::kSlowdown));
  EXPECT_FALSE(read.ok()) << "the client's Read succeeded after the server shut down";
  if (!read.ok()) {
    // As when a link ends: a node that shuts down is gone, and the all-reduce counts only
    // UNAVAILABLE as proof of that.
    EXPECT_EQ(read.status().code(), StatusCode::kUnavailable) << read.status().ToString();
  }
  EXPECT_TRUE(shut_down.WaitFor(test::kPromptly)) << "Shutdown waited on the blocked handler";
  shutdown.join();
  auto handler_reads = Await(state->reads_ended.future());
  EXPECT_FALSE(handler_reads.ok()) << "the handler's reads ended with OK at shutdown";

  // The client node is not hurt: it still opens streams, ordinary and direct, to a fresh server.
  auto fresh = StartNode(DirectOptions());
  ASSERT_NE(fresh, nullptr);
  fresh->RegisterStream("echo_stream", EchoStream);
  auto ordinary = client_->OpenStream(fresh->visible_address(), "echo_stream",
                                      CallOptions{Milliseconds(20000)});
  EXPECT_TRUE(EchoWorks(*ordinary));
  auto direct = client_->OpenStream(fresh->visible_address(), "echo_stream", Direct());
  EXPECT_TRUE(EchoWorks(*direct));
  EXPECT_TRUE(direct->direct());
}

TEST_F(DirectStreamTest, ClientShutdownFailsTheServersRead) {
  auto state = std::make_shared<HoldState>();
  server_->RegisterStream("hold", Hold(state));
  auto stream = OpenDirect("hold");
  ASSERT_TRUE(Await(stream->Write(Message("first"))).ok());
  ASSERT_TRUE(state->got_message.WaitFor(test::kPromptly));
  EXPECT_EQ(state->direct.load(), 1) << "the handler's stream was not direct";

  client_->Shutdown();
  auto read = Await(state->reads_ended.future(), Milliseconds(5000 * test::kSlowdown));
  ASSERT_FALSE(read.ok()) << "the server's Read succeeded after the client shut down";
  EXPECT_EQ(read.status().code(), StatusCode::kUnavailable) << read.status().ToString();

  auto other = StartNode(DirectOptions());
  ASSERT_NE(other, nullptr);
  auto again = other->OpenStream(server_->visible_address(), "echo_stream", Direct());
  EXPECT_TRUE(EchoWorks(*again));
  EXPECT_TRUE(again->direct());
}

// A raw TCP connection to a node's direct port on loopback, speaking (or not) the framing of
// proto/transport.proto: [u32 little-endian length][DirectFrame][payload bytes]...
class RawDirectConnection {
 public:
  enum class Got { kFrame, kClosed, kNothing, kGarbage };

  explicit RawDirectConnection(uint32_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) {
      ADD_FAILURE() << "socket failed: " << std::strerror(errno);
      return;
    }
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      ADD_FAILURE() << "connect to port " << port << " failed: " << std::strerror(errno);
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~RawDirectConnection() {
    if (fd_ >= 0) ::close(fd_);
  }
  RawDirectConnection(const RawDirectConnection&) = delete;
  RawDirectConnection& operator=(const RawDirectConnection&) = delete;

  bool ok() const { return fd_ >= 0; }

  // False when the node closed the connection first, which a rogue must expect.
  bool SendBytes(const std::string& bytes) {
    size_t sent = 0;
    while (sent < bytes.size()) {
      ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      sent += static_cast<size_t>(n);
    }
    return true;
  }
  static std::string LengthPrefixed(const std::string& body) {
    uint32_t size = static_cast<uint32_t>(body.size());
    std::string prefix(4, '\0');
    for (int i = 0; i < 4; ++i) prefix[i] = static_cast<char>((size >> (8 * i)) & 0xff);
    return prefix + body;
  }
  bool SendFrame(const wire::DirectFrame& frame) {
    return SendBytes(LengthPrefixed(frame.SerializeAsString()));
  }

  // The next frame (its payload bytes are read and dropped).
  Got ReadFrame(wire::DirectFrame* frame, Milliseconds timeout) {
    auto deadline = Clock::now() + timeout;
    std::string prefix;
    Got got = ReadExactly(4, &prefix, deadline);
    if (got != Got::kFrame) return got;
    uint32_t size = 0;
    for (int i = 0; i < 4; ++i) size |= uint32_t{static_cast<uint8_t>(prefix[i])} << (8 * i);
    if (size > (16u << 20)) return Got::kGarbage;
    std::string body;
    got = ReadExactly(size, &body, deadline);
    if (got != Got::kFrame) return got;
    if (!frame->ParseFromString(body)) return Got::kGarbage;
    for (uint64_t payload_size : frame->payload_sizes()) {
      if (payload_size > (64u << 20)) return Got::kGarbage;
      std::string payload;
      got = ReadExactly(payload_size, &payload, deadline);
      if (got != Got::kFrame) return got;
    }
    return Got::kFrame;
  }

  // Reads and drops whatever comes until the node closes the connection; whether it did.
  bool ClosedWithin(Milliseconds timeout) {
    auto deadline = Clock::now() + timeout;
    while (true) {
      std::string ignored;
      Got got = ReadExactly(1, &ignored, deadline);
      if (got == Got::kClosed) return true;
      if (got == Got::kNothing) return false;
    }
  }

 private:
  Got ReadExactly(size_t size, std::string* out, Clock::time_point deadline) {
    out->resize(size);
    size_t done = 0;
    while (done < size) {
      auto left = std::chrono::duration_cast<Milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return Got::kNothing;
      pollfd descriptor{fd_, POLLIN, 0};
      int ready = ::poll(&descriptor, 1, static_cast<int>(left));
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) return Got::kNothing;
      ssize_t n = ::recv(fd_, out->data() + done, size - done, 0);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) return Got::kClosed;  // an orderly close, or a reset
      done += static_cast<size_t>(n);
    }
    return Got::kFrame;
  }

  int fd_ = -1;
};

wire::DirectFrame HelloFrame(const std::string& token, const std::string& method = "echo_stream") {
  wire::DirectFrame hello;
  hello.set_kind(wire::DIRECT_HELLO);
  hello.set_token(token);
  hello.set_method(method);
  hello.set_timeout_ms(10000);
  return hello;
}

// Whether the node answers our DIRECT_CLOSE (status OK) with a DIRECT_CLOSE of its own, status OK.
::testing::AssertionResult ClosedCleanly(RawDirectConnection& connection) {
  wire::DirectFrame close;
  close.set_kind(wire::DIRECT_CLOSE);
  if (!connection.SendFrame(close))
    return ::testing::AssertionFailure() << "could not send the close";
  wire::DirectFrame closed;
  if (connection.ReadFrame(&closed, test::kPromptly) != RawDirectConnection::Got::kFrame) {
    return ::testing::AssertionFailure() << "no frame answered the close";
  }
  if (closed.kind() != wire::DIRECT_CLOSE || closed.status().code() != 0) {
    return ::testing::AssertionFailure() << "answered with kind " << static_cast<int>(closed.kind())
                                         << ", status " << closed.status().message();
  }
  return ::testing::AssertionSuccess();
}

// Whether the node refused what `connection` sent: a DIRECT_ACK with a non-zero code and then a
// close, or a close alone.
::testing::AssertionResult Refused(RawDirectConnection& connection) {
  wire::DirectFrame frame;
  switch (connection.ReadFrame(&frame, kRefusalWait)) {
    case RawDirectConnection::Got::kClosed:
      return ::testing::AssertionSuccess() << "closed";
    case RawDirectConnection::Got::kNothing:
      return ::testing::AssertionFailure()
             << "neither an answer nor a close within " << kRefusalWait.count() << " ms";
    case RawDirectConnection::Got::kGarbage:
      return ::testing::AssertionFailure() << "the node answered with bytes that are no frame";
    case RawDirectConnection::Got::kFrame:
      break;
  }
  if (frame.kind() != wire::DIRECT_ACK) {
    return ::testing::AssertionFailure() << "the node answered with a frame of kind "
                                         << static_cast<int>(frame.kind()) << ", not DIRECT_ACK";
  }
  if (frame.status().code() == 0) {
    return ::testing::AssertionFailure() << "the node accepted (DIRECT_ACK with status OK)";
  }
  if (!connection.ClosedWithin(kRefusalWait)) {
    return ::testing::AssertionFailure()
           << "the node refused (" << frame.status().message() << ") but kept the connection open";
  }
  return ::testing::AssertionSuccess() << "refused: " << frame.status().message();
}

TEST_F(DirectStreamTest, HelloWithAWrongTokenIsRefused) {
  auto offer = AskForOffer();
  ASSERT_TRUE(offer.ok()) << offer.status().ToString();
  std::string altered = offer->token().empty() ? std::string("x") : offer->token();
  altered[0] = static_cast<char>(altered[0] ^ 0x5a);
  for (const std::string& token : {altered, std::string(), std::string(32, '\0')}) {
    RawDirectConnection rogue(offer->port());
    ASSERT_TRUE(rogue.ok());
    rogue.SendFrame(HelloFrame(token));  // the node may close before it is all sent: fine
    EXPECT_TRUE(Refused(rogue)) << "token of " << token.size() << " bytes";
  }
  EXPECT_EQ(echo_handlers_.load(), 0) << "a refused connection reached the handler";
  ExpectServerStillServesDirectStreams();
}

TEST_F(DirectStreamTest, ATokenServesOneConnectionOnly) {
  auto offer = AskForOffer();
  ASSERT_TRUE(offer.ok()) << offer.status().ToString();
  RawDirectConnection first(offer->port());
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(first.SendFrame(HelloFrame(offer->token())));
  wire::DirectFrame ack;
  ASSERT_EQ(first.ReadFrame(&ack, kRefusalWait), RawDirectConnection::Got::kFrame)
      << "no answer to a HELLO with a fresh token";
  ASSERT_EQ(ack.kind(), wire::DIRECT_ACK);
  ASSERT_EQ(ack.status().code(), 0u) << ack.status().message();
  // The token was used for real: the echo handler answers a message sent by hand.
  wire::DirectFrame data;
  data.set_kind(wire::DIRECT_DATA);
  data.set_header("by hand");
  ASSERT_TRUE(first.SendFrame(data));
  wire::DirectFrame echoed;
  ASSERT_EQ(first.ReadFrame(&echoed, test::kPromptly), RawDirectConnection::Got::kFrame);
  EXPECT_EQ(echoed.kind(), wire::DIRECT_DATA);
  EXPECT_EQ(echoed.header(), "by hand");
  EXPECT_EQ(echoed.payload_sizes_size(), 0);

  // The same token again, while its first connection is still open, and after it ended.
  RawDirectConnection second(offer->port());
  ASSERT_TRUE(second.ok());
  second.SendFrame(HelloFrame(offer->token()));
  EXPECT_TRUE(Refused(second)) << "while the first connection is open";

  EXPECT_TRUE(ClosedCleanly(first));

  RawDirectConnection third(offer->port());
  ASSERT_TRUE(third.ok());
  third.SendFrame(HelloFrame(offer->token()));
  EXPECT_TRUE(Refused(third)) << "after the first connection ended";
  EXPECT_EQ(echo_handlers_.load(), 1) << "a refused connection reached the handler";
  ExpectServerStillServesDirectStreams();
}

// After a clean end both ways the node waits on the connection for its caller's next stream: a
// hello without a token (the connection is already the caller's). A hello with one is refused.
TEST_F(DirectStreamTest, AKeptConnectionTakesTheCallersNextHelloOnly) {
  auto offer = AskForOffer();
  ASSERT_TRUE(offer.ok()) << offer.status().ToString();
  RawDirectConnection connection(offer->port());
  ASSERT_TRUE(connection.ok());
  auto run_stream = [&](const std::string& token, const std::string& text) {
    ASSERT_TRUE(connection.SendFrame(HelloFrame(token)));
    wire::DirectFrame ack;
    ASSERT_EQ(connection.ReadFrame(&ack, kRefusalWait), RawDirectConnection::Got::kFrame);
    ASSERT_EQ(ack.kind(), wire::DIRECT_ACK);
    ASSERT_EQ(ack.status().code(), 0u) << ack.status().message();
    wire::DirectFrame data;
    data.set_kind(wire::DIRECT_DATA);
    data.set_header(text);
    ASSERT_TRUE(connection.SendFrame(data));
    wire::DirectFrame echoed;
    ASSERT_EQ(connection.ReadFrame(&echoed, test::kPromptly), RawDirectConnection::Got::kFrame);
    EXPECT_EQ(echoed.kind(), wire::DIRECT_DATA);
    EXPECT_EQ(echoed.header(), text);
    EXPECT_TRUE(ClosedCleanly(connection));
  };
  run_stream(offer->token(), "first");
  run_stream("", "second, on the same connection");
  run_stream("", "third");
  EXPECT_EQ(echo_handlers_.load(), 3);

  auto another = AskForOffer();  // a valid token, but for a connection of its own
  ASSERT_TRUE(another.ok()) << another.status().ToString();
  connection.SendFrame(HelloFrame(another->token()));
  EXPECT_TRUE(connection.ClosedWithin(kRefusalWait));
  EXPECT_EQ(echo_handlers_.load(), 3) << "a hello with a token ran a handler on a kept connection";
  ExpectServerStillServesDirectStreams();
}

TEST_F(DirectStreamTest, GarbageOnTheDirectPortClosesTheConnection) {
  auto offer = AskForOffer();
  ASSERT_TRUE(offer.ok()) << offer.status().ToString();
  const uint32_t port = offer->port();
  {
    // A length no frame can have: the node must not wait for (or allocate) 4 GiB.
    RawDirectConnection rogue(port);
    ASSERT_TRUE(rogue.ok());
    rogue.SendBytes(std::string("\xff\xff\xff\xff", 4) + std::string(64, '\x42'));
    EXPECT_TRUE(Refused(rogue)) << "length 0xFFFFFFFF";
  }
  {
    // Bytes that are no DirectFrame (field number 0 is invalid).
    std::string unparseable("\x00\x01\x02\x03garbage", 11);
    ASSERT_FALSE(wire::DirectFrame().ParseFromString(unparseable));
    RawDirectConnection rogue(port);
    ASSERT_TRUE(rogue.ok());
    rogue.SendBytes(RawDirectConnection::LengthPrefixed(unparseable));
    EXPECT_TRUE(Refused(rogue)) << "an unparseable frame";
  }
  {
    // Well-formed frames, but not a HELLO first.
    wire::DirectFrame data;
    data.set_kind(wire::DIRECT_DATA);
    data.set_header("no hello");
    data.add_payload_sizes(3);
    RawDirectConnection rogue(port);
    ASSERT_TRUE(rogue.ok());
    rogue.SendBytes(RawDirectConnection::LengthPrefixed(data.SerializeAsString()) + "abc");
    EXPECT_TRUE(Refused(rogue)) << "DIRECT_DATA before any HELLO";
  }
  {
    RawDirectConnection rogue(port);
    ASSERT_TRUE(rogue.ok());
    rogue.SendBytes(std::string(4, '\0'));  // an empty frame: kind DIRECT_UNSPECIFIED
    EXPECT_TRUE(Refused(rogue)) << "an empty frame";
  }
  {
    // A HELLO cut off in the middle, then gone: nothing to check but that the node survives.
    std::string hello =
        RawDirectConnection::LengthPrefixed(HelloFrame(offer->token()).SerializeAsString());
    RawDirectConnection rogue(port);
    ASSERT_TRUE(rogue.ok());
    rogue.SendBytes(hello.substr(0, hello.size() / 2));
  }
  EXPECT_EQ(echo_handlers_.load(), 0) << "garbage reached the handler";
  ExpectServerStillServesDirectStreams();
}

TEST_F(DirectStreamTest, SilentConnectionsDoNotHoldUpOthers) {
  auto offer = AskForOffer();
  ASSERT_TRUE(offer.ok()) << offer.status().ToString();
  // Open for the whole test: one says nothing, one sends half a length prefix.
  RawDirectConnection silent(offer->port());
  ASSERT_TRUE(silent.ok());
  RawDirectConnection stalled(offer->port());
  ASSERT_TRUE(stalled.ok());
  stalled.SendBytes(std::string("\x10\x00", 2));

  // Well within any wait for a HELLO: the node must not serve its connections one at a time.
  auto start = Clock::now();
  auto stream = OpenDirect("echo_stream");
  EXPECT_TRUE(EchoWorks(*stream));
  EXPECT_TRUE(stream->direct());
  EXPECT_LT(SecondsSince(start), 2.0 * test::kSlowdown);
  EXPECT_EQ(direct_echo_handlers_.load(), 1);
  ExpectServerStillServesDirectStreams();
}

TEST_F(DirectStreamTest, MessagesBeyondTheServersLimitsFailTheStream) {
  NodeOptions server_options = DirectOptions();
  server_options.max_message_bytes = kMiB;
  server_options.max_header_bytes = 64 << 10;
  StartNodes(server_options, DirectOptions());  // the client's own limits are the default ones

  const std::vector<Sample> oversized = {
      {"2 MiB payload", {std::string(2 * kMiB, 'x')}},
      {std::string(128 << 10, 'h'), {}},  // a 128 KiB header
  };
  for (size_t i = 0; i < oversized.size(); ++i) {
    auto stream = OpenDirect("echo_stream");
    // The write may fail, or complete once handed to the connection; the stream must fail.
    auto written = Await(stream->Write(oversized[i].ToMessage()));
    EXPECT_TRUE(stream->direct()) << i;
    auto next = Await(stream->Read());
    EXPECT_FALSE(next.ok()) << i << ": the server took a message beyond its limits";
    if (!next.ok()) {
      // Lets the log show which error the limit produced, whatever its code.
      std::cout << "message " << i << ": write " << written.status().ToString() << ", read "
                << next.status().ToString() << "\n";
    }
  }
  ExpectServerStillServesDirectStreams();
}

TEST_F(DirectStreamTest, ManyDirectStreamsAtOnceStayApart) {
  constexpr int kStreams = 16;
  constexpr int kMessages = 8;
  std::vector<std::string> failures(kStreams);
  std::vector<int> direct(kStreams, -1);
  std::vector<std::thread> threads;
  for (int s = 0; s < kStreams; ++s) {
    threads.emplace_back([&, s] {
      std::vector<Sample> samples;
      for (int i = 0; i < kMessages; ++i) {
        samples.push_back(
            {std::to_string(s) + ":" + std::to_string(i), {PatternString(256 << 10, s * 100 + i)}});
      }
      auto stream = OpenDirect("echo_stream");
      for (const auto& sample : samples) stream->Write(sample.ToMessage());
      stream->CloseWrite();
      auto messages = ReadAll(*stream, kHandlerWait);
      direct[s] = stream->direct() ? 1 : 0;
      if (!messages.ok()) {
        failures[s] = messages.status().ToString();
        return;
      }
      if (messages->size() != samples.size()) {
        failures[s] = "got " + std::to_string(messages->size()) + " messages";
        return;
      }
      for (int i = 0; i < kMessages; ++i) {
        std::string difference = Difference((*messages)[i], samples[i]);
        if (!difference.empty()) {
          failures[s] = "message " + std::to_string(i) + ": " + difference;
          return;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int s = 0; s < kStreams; ++s) {
    EXPECT_EQ(failures[s], "") << "stream " << s;
    EXPECT_EQ(direct[s], 1) << "stream " << s;
  }
  EXPECT_EQ(echo_handlers_.load(), kStreams);
  EXPECT_EQ(direct_echo_handlers_.load(), kStreams);
}

// A rogue that stole a token (it travels in the clear) holds no key: the node's sealed ACK means
// nothing to it, and the first record it sends that does not open fails the stream and closes the
// connection.
TEST_F(DirectStreamTest, EncryptedStreamsRefuseFramesThatAreNotSealed) {
  StartNodes(TestNodeOptions(), TestNodeOptions());
  auto offer = AskForOffer();
  ASSERT_TRUE(offer.ok()) << offer.status().ToString();
  RawDirectConnection rogue(offer->port());
  ASSERT_TRUE(rogue.ok());
  ASSERT_TRUE(rogue.SendFrame(HelloFrame(offer->token())));
  wire::DirectFrame data;
  data.set_kind(wire::DIRECT_DATA);
  data.set_header("unsealed");
  rogue.SendFrame(data);
  rogue.SendBytes(std::string(64, 'x'));  // enough for a whole record: it must not open
  EXPECT_TRUE(rogue.ClosedWithin(kRefusalWait)) << "the node kept a connection with no key";
  auto stream = OpenDirect("echo_stream");
  EXPECT_TRUE(EchoWorks(*stream));
  EXPECT_TRUE(stream->direct());
}

// ---- ReceivePlacer: where received payloads land ----

// What a test placer saw, filled on the stream's reader thread.
struct PlacerLog {
  std::mutex mutex;
  std::vector<Payload> buffers;         // every buffer `place` returned, in order
  std::vector<std::string> arrived;     // by buffer: the bytes `arrived` was told about
  std::vector<int> complete;            // by buffer: -1 until `placed`, then 0 or 1
  std::vector<std::string> misordered;  // runs that were not in order or not aligned
};

// Places payload `index` of messages whose header starts with "place" in a buffer of its own (one
// byte short for headers starting with "place short"), and logs what it is told.
std::shared_ptr<ReceivePlacer> LoggingPlacer(std::shared_ptr<PlacerLog> log,
                                             std::function<void()> on_first_arrival = {}) {
  auto placer = std::make_shared<ReceivePlacer>();
  placer->place = [log](const std::string& header, size_t index, size_t size) {
    if (header.rfind("place", 0) != 0 || size == 0 || index > 1) return Payload();
    Payload buffer = Payload::Allocate(header.rfind("place short", 0) == 0 ? size - 1 : size);
    std::lock_guard<std::mutex> lock(log->mutex);
    log->buffers.push_back(buffer);
    log->arrived.emplace_back();
    log->complete.push_back(-1);
    return buffer;
  };
  auto first = std::make_shared<std::atomic<bool>>(true);
  placer->arrived = [log, on_first_arrival, first](const uint8_t* data, size_t size) {
    std::lock_guard<std::mutex> lock(log->mutex);
    const Payload& buffer = log->buffers.back();
    std::string& seen = log->arrived.back();
    const size_t offset = static_cast<size_t>(data - buffer.data());
    const bool ends = offset + size == buffer.size();
    if (offset != seen.size() || offset % kArrivalAlignment != 0 ||
        (!ends && size % kArrivalAlignment != 0)) {
      log->misordered.push_back(std::to_string(size) + " bytes at " + std::to_string(offset) +
                                " after " + std::to_string(seen.size()));
    }
    seen.append(reinterpret_cast<const char*>(data), size);
    if (on_first_arrival && first->exchange(false)) on_first_arrival();
  };
  placer->placed = [log](const Payload& buffer, bool complete) {
    std::lock_guard<std::mutex> lock(log->mutex);
    for (size_t i = 0; i < log->buffers.size(); ++i) {
      if (log->buffers[i].data() == buffer.data()) log->complete[i] = complete ? 1 : 0;
    }
  };
  return placer;
}

// Placed payloads arrive in the placer's buffers, seen by `arrived` byte for byte in aligned runs;
// declined ones and ones given a buffer of the wrong size arrive in the transport's buffers.
// Plain and sealed streams alike (a sealed one reports each record once it opened).
TEST_F(DirectStreamTest, ReceivePlacerChoosesWherePayloadsLandAndSeesEveryByte) {
  for (bool encryption : {false, true}) {
    SCOPED_TRACE(encryption ? "sealed" : "plain");
    if (encryption) StartNodes(TestNodeOptions(), TestNodeOptions());
    auto log = std::make_shared<PlacerLog>();
    auto stream = OpenDirect("echo_stream");
    ASSERT_TRUE(stream->SetReceivePlacer(LoggingPlacer(log)));
    const std::vector<Sample> samples = {
        {"place two", {PatternString(3 * kMiB / 2 + 100, 1), PatternString(100, 2), ""}},
        {"keep", {PatternString(kMiB, 3)}},
        {"place short", {PatternString(200000, 4)}},
        {"place one", {PatternString(63, 5)}},
    };
    for (const auto& sample : samples) stream->Write(sample.ToMessage());
    stream->CloseWrite();
    auto echoed = ReadAll(*stream);
    ASSERT_TRUE(echoed.ok()) << echoed.status().ToString();
    ASSERT_EQ(echoed->size(), samples.size());
    for (size_t i = 0; i < samples.size(); ++i) {
      EXPECT_EQ(Difference((*echoed)[i], samples[i]), "") << "message " << i;
    }
    ASSERT_TRUE(stream->direct());
    std::lock_guard<std::mutex> lock(log->mutex);
    EXPECT_TRUE(log->misordered.empty()) << log->misordered.front();
    // Placed: both payloads of "place two", the short buffer, and "place one".
    ASSERT_EQ(log->buffers.size(), 4u);
    const std::vector<std::pair<size_t, size_t>> placed = {{0, 0}, {0, 1}, {3, 0}};
    const std::vector<size_t> log_index = {0, 1, 3};
    for (size_t k = 0; k < placed.size(); ++k) {
      const auto [message, payload] = placed[k];
      const size_t b = log_index[k];
      EXPECT_EQ((*echoed)[message].payloads[payload].data(), log->buffers[b].data())
          << "message " << message << " payload " << payload << " was not read in place";
      EXPECT_EQ(log->arrived[b], samples[message].payloads[payload]) << "buffer " << b;
      EXPECT_EQ(log->complete[b], 1) << "buffer " << b;
    }
    // The short buffer is handed back unused, and the payload read as if it was declined.
    EXPECT_EQ(log->complete[2], 0);
    EXPECT_EQ(log->arrived[2], "");
    EXPECT_NE((*echoed)[2].payloads[0].data(), log->buffers[2].data());
  }
}

// A read that fails in the middle of a placed payload says so: the buffer comes back incomplete,
// and the stream fails instead of delivering the message.
TEST_F(DirectStreamTest, ReceivePlacerLearnsOfAReadCutShort) {
  constexpr size_t kFlood = 32 * kMiB;  // more than the socket buffers hold: it cannot all be in
  server_->RegisterStream("flood", [](const CallContext&, Stream& stream) {
    auto first = stream.Read().WaitFor(kHandlerWait);
    if (!first || !first->ok()) return Status(StatusCode::kInternal, "TEST: no request");
    auto written =
        stream.Write(MakeMessage("place flood", {PatternString(kFlood, 8)})).WaitFor(kHandlerWait);
    return written ? written->status() : Status(StatusCode::kInternal, "TEST: write stuck");
  });
  auto log = std::make_shared<PlacerLog>();
  auto stream = OpenDirect("flood");
  std::weak_ptr<Stream> weak = stream;
  ASSERT_TRUE(stream->SetReceivePlacer(LoggingPlacer(log, [weak] {
    if (auto self = weak.lock()) self->Cancel();
  })));
  stream->Write(Message("go"));
  auto read = Await(stream->Read());
  ASSERT_FALSE(read.ok()) << "a message cut short was delivered";
  EXPECT_EQ(read.status().code(), StatusCode::kCancelled) << read.status().ToString();
  // The reader thread tells the placer before it ends: wait for that, bounded.
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        std::lock_guard<std::mutex> lock(log->mutex);
        return !log->complete.empty() && log->complete[0] != -1;
      },
      kHandlerWait));
  std::lock_guard<std::mutex> lock(log->mutex);
  ASSERT_EQ(log->buffers.size(), 1u);
  EXPECT_EQ(log->complete[0], 0);
  EXPECT_LT(log->arrived[0].size(), kFlood);
  EXPECT_TRUE(log->misordered.empty()) << log->misordered.front();
}

}  // namespace
}  // namespace hivemind::net
