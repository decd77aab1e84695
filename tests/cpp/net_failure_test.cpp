// Failures and hostile peers: a peer process killed mid-call, impersonation, garbage on the
// listening port, malformed frames from an authenticated peer, and client-mode callbacks.
//
// This file has its own main(): with HIVEMIND_TEST_PEER_ROLE set, the binary is the peer process of
// a test (see RunPeer); otherwise it runs the tests.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iostream>
#include <random>
#include <thread>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "net/node.h"
#include "proto/transport.pb.h"
#include "test_util.h"

namespace hivemind::net {
namespace {

using test::Await;
using test::ChildProcess;
using test::Clock;
using test::MakeMessage;
using test::SecondsSince;
using test::StartNode;
using test::TestNodeOptions;

constexpr char kRoleVariable[] = "HIVEMIND_TEST_PEER_ROLE";

// ---------------------------------------------------------------------------------------------
// The peer process.

// Serves "hang" (never answers; prints "hang-started") and "slow_stream" (writes "ready", prints
// "stream-started", then waits for input), prints its address, and lives until stdin closes.
int RunPeer(const std::string& role) {
  if (role != "server") {
    std::cerr << "unknown " << kRoleVariable << " '" << role << "'\n";
    return 2;
  }
  auto started = Node::Start(TestNodeOptions());
  if (!started.ok()) {
    std::cerr << "peer: " << started.status().ToString() << "\n";
    return 1;
  }
  std::unique_ptr<Node> node = std::move(started).value();
  std::mutex mutex;
  std::vector<Responder> kept;  // never answered
  node->RegisterUnary("hang", [&](const CallContext&, Message, Responder respond) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      kept.push_back(std::move(respond));
    }
    std::cout << "hang-started" << std::endl;
  });
  node->RegisterStream("slow_stream", [](const CallContext&, Stream& stream) {
    stream.Write(Message("ready")).WaitFor(Milliseconds(60000));
    std::cout << "stream-started" << std::endl;
    stream.Read().WaitFor(Milliseconds(60000));
    return Status::Ok();
  });
  std::cout << node->visible_address().ToString() << std::endl;
  char byte;
  while (::read(STDIN_FILENO, &byte, 1) > 0) {
  }
  node->Shutdown();
  return 0;
}

// A peer process serving as above, and its address.
struct PeerProcess {
  std::unique_ptr<ChildProcess> process;
  PeerAddress address;
};

PeerProcess SpawnServerPeer() {
  PeerProcess peer;
  peer.process = ChildProcess::Spawn({std::string(kRoleVariable) + "=server"});
  if (peer.process == nullptr) return peer;
  auto line = peer.process->ReadLine(Milliseconds(10000));
  if (!line) {
    ADD_FAILURE() << "the peer process printed no address";
    return peer;
  }
  auto address = PeerAddress::ParseList(*line);
  if (!address.ok()) {
    ADD_FAILURE() << "the peer process printed '" << *line << "': " << address.status().ToString();
    return peer;
  }
  peer.address = *address;
  return peer;
}

// ---------------------------------------------------------------------------------------------
// A killed peer.

TEST(KilledPeerTest, PendingUnaryCallFailsWithUnavailableSoonAfterTheKill) {
  PeerProcess peer = SpawnServerPeer();
  ASSERT_NE(peer.process, nullptr);
  ASSERT_FALSE(peer.address.endpoints.empty());
  auto client = StartNode();
  ASSERT_NE(client, nullptr);

  auto call = client->Call(peer.address, "hang", Message("x"), CallOptions{Milliseconds(60000)});
  ASSERT_EQ(peer.process->ReadLine(Milliseconds(5000)), std::optional<std::string>("hang-started"));
  auto killed_at = Clock::now();
  peer.process->Kill(SIGKILL);
  auto reply = Await(call, Milliseconds(10000));
  double elapsed = SecondsSince(killed_at);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kUnavailable) << reply.status().ToString();
  EXPECT_LT(elapsed, 2.5) << reply.status().ToString();
}

TEST(KilledPeerTest, PendingStreamReadFailsWithUnavailableSoonAfterTheKill) {
  PeerProcess peer = SpawnServerPeer();
  ASSERT_NE(peer.process, nullptr);
  ASSERT_FALSE(peer.address.endpoints.empty());
  auto client = StartNode();
  ASSERT_NE(client, nullptr);

  auto stream = client->OpenStream(peer.address, "slow_stream", CallOptions{Milliseconds(60000)});
  auto first = Await(stream->Read());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_TRUE(first->has_value());
  EXPECT_EQ((*first)->header, "ready");
  ASSERT_EQ(peer.process->ReadLine(Milliseconds(5000)),
            std::optional<std::string>("stream-started"));

  auto pending = stream->Read();
  auto killed_at = Clock::now();
  peer.process->Kill(SIGKILL);
  auto read = Await(pending, Milliseconds(10000));
  double elapsed = SecondsSince(killed_at);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kUnavailable) << read.status().ToString();
  EXPECT_LT(elapsed, 2.5) << read.status().ToString();
  auto write = Await(stream->Write(Message("after death")), Milliseconds(2000));
  EXPECT_FALSE(write.ok());
}

// Node::Shutdown in a process that goes on (Python's DHT.shutdown(), a test's "kill") must look to
// the peers like a death: its connections close, so their streams fail at once.
TEST(KilledPeerTest, AShutDownNodeInALiveProcessLooksDeadToItsPeers) {
  for (bool peer_dialed_first : {false, true}) {
    SCOPED_TRACE(peer_dialed_first ? "the peer dialed first" : "the client dialed first");
    auto server = StartNode();
    auto client = StartNode();
    ASSERT_NE(server, nullptr);
    ASSERT_NE(client, nullptr);
    test::Notification served;
    server->RegisterStream("hold", [&](const CallContext&, Stream& stream) {
      stream.Write(Message("ready"));
      served.Notify();
      stream.Read().WaitFor(Milliseconds(60000));
      return Status::Ok();
    });
    client->RegisterUnary(
        "ping", [](const CallContext&, Message, Responder respond) { respond(Message("pong")); });
    if (peer_dialed_first) {
      auto pong = Await(server->Call(client->visible_address(), "ping", Message("x")));
      ASSERT_TRUE(pong.ok()) << pong.status().ToString();
    }
    auto stream =
        client->OpenStream(server->visible_address(), "hold", CallOptions{Milliseconds(60000)});
    auto first = Await(stream->Read());
    ASSERT_TRUE(first.ok() && first->has_value()) << first.status().ToString();
    ASSERT_TRUE(served.WaitFor(Milliseconds(5000)));
    auto pending = stream->Read();
    auto shut_at = Clock::now();
    server->Shutdown();  // the object stays alive, as in a process that goes on
    auto read = Await(pending, Milliseconds(10000));
    ASSERT_FALSE(read.ok());
    EXPECT_EQ(read.status().code(), StatusCode::kUnavailable) << read.status().ToString();
    EXPECT_LT(SecondsSince(shut_at), 2.0) << read.status().ToString();
  }
}

TEST(KilledPeerTest, CallingTheDeadPeerAgainFailsWithinTheConnectTimeout) {
  PeerProcess peer = SpawnServerPeer();
  ASSERT_NE(peer.process, nullptr);
  ASSERT_FALSE(peer.address.endpoints.empty());
  auto client = StartNode();
  ASSERT_NE(client, nullptr);

  auto call = client->Call(peer.address, "hang", Message("x"), CallOptions{Milliseconds(60000)});
  ASSERT_EQ(peer.process->ReadLine(Milliseconds(5000)), std::optional<std::string>("hang-started"));
  peer.process->Kill(SIGKILL);
  peer.process->Reap();
  ASSERT_FALSE(Await(call, Milliseconds(10000)).ok());

  auto start = Clock::now();
  auto again =
      Await(client->Call(peer.address, "hang", Message("y"), CallOptions{Milliseconds(60000)}),
            Milliseconds(10000));
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), StatusCode::kUnavailable) << again.status().ToString();
  EXPECT_LT(SecondsSince(start), 2.0 + 1.5);
}

// Each connection to a killed peer is closed while libzmq may still report on it (its automatic
// reconnect is refused 100 ms later). An event that found its monitor's reader closed used to
// block libzmq's I/O thread for good: every later call of the survivor timed out (seen in the
// swarm test on a loaded machine). Busy threads widen the window, as that load did.
TEST(KilledPeerTest, ASurvivorOfManyKilledPeersKeepsWorking) {
  auto client = StartNode();
  ASSERT_NE(client, nullptr);
  auto pong = [](const CallContext&, Message, Responder respond) { respond(Message("pong")); };
  client->RegisterUnary("ping", pong);
  std::atomic<bool> busy{true};
  std::vector<std::thread> hogs;
  for (int i = 0; i < 3; ++i) {
    hogs.emplace_back([&busy] {
      while (busy.load(std::memory_order_relaxed)) {
      }
    });
  }
  for (int round = 0; round < 12; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    std::vector<PeerProcess> peers;
    std::vector<std::shared_ptr<Stream>> streams;
    for (int i = 0; i < 6; ++i) {
      peers.push_back(SpawnServerPeer());
      ASSERT_NE(peers.back().process, nullptr);
      streams.push_back(client->OpenStream(peers.back().address, "slow_stream",
                                           CallOptions{Milliseconds(60000)}));
    }
    for (auto& stream : streams) {
      auto ready = Await(stream->Read(), Milliseconds(20000));
      ASSERT_TRUE(ready.ok()) << ready.status().ToString();
    }
    for (auto& peer : peers) peer.process->Kill(SIGKILL);
    for (auto& stream : streams) ASSERT_FALSE(Await(stream->Read(), Milliseconds(20000)).ok());
    for (auto& peer : peers) peer.process->Reap();
    // New connections both ways: the survivor still dials out and accepts.
    auto dialed = StartNode();
    auto dialing = StartNode();
    dialed->RegisterUnary("ping", pong);
    auto out = Await(client->Call(dialed->visible_address(), "ping", Message("x"),
                                  CallOptions{Milliseconds(5000)}),
                     Milliseconds(10000));
    EXPECT_TRUE(out.ok()) << out.status().ToString();
    auto in = Await(dialing->Call(client->visible_address(), "ping", Message("y"),
                                  CallOptions{Milliseconds(5000)}),
                    Milliseconds(10000));
    EXPECT_TRUE(in.ok()) << in.status().ToString();
    if (!out.ok() || !in.ok()) break;
  }
  busy = false;
  for (auto& hog : hogs) hog.join();
}

// ---------------------------------------------------------------------------------------------
// A raw ZeroMQ peer speaking the wire protocol by hand.

struct Received {
  wire::Envelope envelope;
  std::vector<std::string> payloads;
};

class RawPeer {
 public:
  // A DEALER connected to `server`; with `keys`, it authenticates with CURVE as that identity.
  RawPeer(const PeerAddress& server, const Identity* keys)
      : socket_(context_, zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    if (keys != nullptr) {
      auto server_key = server.peer_id.CurvePublicKey();
      EXPECT_TRUE(server_key.ok()) << server_key.status().ToString();
      socket_.set(zmq::sockopt::curve_serverkey, zmq::const_buffer(server_key->data(), 32));
      socket_.set(zmq::sockopt::curve_publickey,
                  zmq::const_buffer(keys->curve_public_key().data(), 32));
      socket_.set(zmq::sockopt::curve_secretkey,
                  zmq::const_buffer(keys->curve_secret_key().data(), 32));
    }
    socket_.connect(server.endpoints.at(0).ZmqEndpoint());
  }

  void SendFrames(const std::vector<std::string>& frames) {
    std::vector<zmq::const_buffer> buffers;
    for (const auto& frame : frames) buffers.emplace_back(frame.data(), frame.size());
    auto sent = zmq::send_multipart(socket_, buffers, zmq::send_flags::dontwait);
    EXPECT_TRUE(sent.has_value()) << "the raw DEALER could not send";
  }

  void Send(const wire::Envelope& envelope, const std::vector<std::string>& payloads = {}) {
    std::vector<std::string> frames = {envelope.SerializeAsString()};
    frames.insert(frames.end(), payloads.begin(), payloads.end());
    SendFrames(frames);
  }

  void SendHello(const PeerId& claimed) {
    wire::Envelope hello;
    hello.set_kind(wire::HELLO);
    hello.mutable_hello()->set_protocol_version(1);
    hello.mutable_hello()->set_min_compatible_version(1);
    hello.mutable_hello()->set_peer_id(std::string(claimed.raw()));
    hello.mutable_hello()->set_client_mode(true);
    Send(hello);
  }

  // The next message other than CREDIT, PING and PONG; nullopt if none arrives within `timeout`.
  std::optional<Received> Receive(Milliseconds timeout) {
    auto deadline = Clock::now() + timeout;
    while (true) {
      auto left = std::chrono::duration_cast<Milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return std::nullopt;
      zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, left);
      if ((item.revents & ZMQ_POLLIN) == 0) continue;
      std::vector<zmq::message_t> frames;
      auto got =
          zmq::recv_multipart(socket_, std::back_inserter(frames), zmq::recv_flags::dontwait);
      if (!got || frames.empty()) continue;
      Received message;
      if (!message.envelope.ParseFromArray(frames[0].data(), static_cast<int>(frames[0].size()))) {
        ADD_FAILURE() << "the node sent an unparseable envelope";
        continue;
      }
      auto kind = message.envelope.kind();
      if (kind == wire::CREDIT || kind == wire::PING || kind == wire::PONG) continue;
      for (size_t i = 1; i < frames.size(); ++i) message.payloads.push_back(frames[i].to_string());
      return message;
    }
  }

  // Receives until a RESPONSE for `call_id` arrives (nullopt at the deadline); the other messages
  // received meanwhile go to `others`.
  std::optional<Received> ReceiveResponse(uint64_t call_id, Milliseconds timeout,
                                          std::vector<Received>* others) {
    auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      auto message = Receive(std::chrono::duration_cast<Milliseconds>(deadline - Clock::now()));
      if (!message) return std::nullopt;
      if (message->envelope.kind() == wire::RESPONSE && message->envelope.call_id() == call_id) {
        return message;
      }
      others->push_back(std::move(*message));
    }
    return std::nullopt;
  }

 private:
  zmq::context_t context_{1};
  zmq::socket_t socket_;
};

wire::Envelope Request(uint64_t call_id, const std::string& method, const std::string& header,
                       const std::vector<std::string>& payloads = {}) {
  wire::Envelope request;
  request.set_kind(wire::REQUEST);
  request.set_call_id(call_id);
  request.set_from_caller(true);
  request.set_method(method);
  request.set_timeout_ms(5000);
  request.set_header(header);
  for (const auto& payload : payloads) request.add_payload_sizes(payload.size());
  request.set_chunk_count(1);
  return request;
}

class HostilePeerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartNode();
    ASSERT_NE(server_, nullptr);
    echo_calls_ = std::make_shared<std::atomic<int>>(0);
    server_->RegisterUnary(
        "echo", [calls = echo_calls_](const CallContext&, Message request, Responder respond) {
          ++*calls;
          respond(std::move(request));
        });
    honest_ = StartNode();
    ASSERT_NE(honest_, nullptr);
  }

  void ExpectHonestCallWorks() {
    auto reply = Await(honest_->Call(server_->visible_address(), "echo", MakeMessage("h", {"p"})));
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    EXPECT_EQ(reply->header, "h");
  }

  std::unique_ptr<Node> server_;
  std::unique_ptr<Node> honest_;
  std::shared_ptr<std::atomic<int>> echo_calls_;
};

TEST_F(HostilePeerTest, PeerClaimingAnotherIdIsRefused) {
  Identity victim = Identity::Generate();    // A: the id the impostor claims
  Identity impostor = Identity::Generate();  // B: the keys it really holds
  RawPeer raw(server_->visible_address(), &impostor);
  raw.SendHello(victim.peer_id());
  auto ack = raw.Receive(Milliseconds(5000));
  ASSERT_TRUE(ack.has_value()) << "no answer to the HELLO";
  EXPECT_EQ(ack->envelope.kind(), wire::HELLO_ACK);
  EXPECT_NE(ack->envelope.status().code(), 0u) << "the impostor's HELLO was accepted";

  raw.Send(Request(1, "echo", "steal"));
  std::vector<Received> others;
  auto response = raw.ReceiveResponse(1, Milliseconds(1000), &others);
  if (response) {
    EXPECT_NE(response->envelope.status().code(), 0u) << "the impostor's REQUEST was served";
  }
  EXPECT_EQ(echo_calls_->load(), 0) << "the handler ran for the impostor";
  for (const auto& message : others) {
    EXPECT_NE(message.envelope.kind(), wire::RESPONSE) << "unexpected RESPONSE";
  }
  auto peers = server_->ConnectedPeers();
  EXPECT_TRUE(std::find(peers.begin(), peers.end(), victim.peer_id()) == peers.end());
  ExpectHonestCallWorks();
}

TEST_F(HostilePeerTest, RequestWithoutHelloIsNotServed) {
  Identity keys = Identity::Generate();
  RawPeer raw(server_->visible_address(), &keys);
  raw.Send(Request(1, "echo", "no hello"));
  std::vector<Received> others;
  auto response = raw.ReceiveResponse(1, Milliseconds(1000), &others);
  if (response) {
    EXPECT_NE(response->envelope.status().code(), 0u) << "a REQUEST without HELLO was served";
  }
  EXPECT_EQ(echo_calls_->load(), 0);
  ExpectHonestCallWorks();
}

TEST_F(HostilePeerTest, CurveClientWithAWrongServerKeyGetsNothing) {
  Identity keys = Identity::Generate();
  PeerAddress wrong = server_->visible_address();
  wrong.peer_id = Identity::Generate().peer_id();
  RawPeer raw(wrong, &keys);
  raw.SendHello(keys.peer_id());
  EXPECT_FALSE(raw.Receive(Milliseconds(1000)).has_value());
  ExpectHonestCallWorks();
}

// A raw TCP connection to 127.0.0.1:port that sends `bytes` and closes.
void SendRawTcp(uint16_t port, const std::string& bytes) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the node may close on us early: that is fine
    sent += static_cast<size_t>(n);
  }
  ::close(fd);
}

TEST_F(HostilePeerTest, GarbageOnTheListeningPortDoesNotHurt) {
  ExpectHonestCallWorks();  // a connection made before the garbage
  uint16_t port = server_->visible_address().endpoints.at(0).port;
  std::mt19937_64 random(1234);
  for (int i = 0; i < 6; ++i) {
    std::string bytes(4096 * (i + 1), '\0');
    for (auto& byte : bytes) byte = static_cast<char>(random());
    SendRawTcp(port, bytes);
  }
  // The start of a ZMTP 3.0 greeting (signature, version, the first letters of a mechanism).
  SendRawTcp(port, std::string("\xff\0\0\0\0\0\0\0\x01\x7f\x03\x00CUR", 15));
  // A whole greeting signature followed by junk.
  SendRawTcp(port, std::string("\xff\0\0\0\0\0\0\0\x01\x7f", 10) + std::string(200, '\x42'));
  SendRawTcp(port, "");

  ExpectHonestCallWorks();
  auto late = StartNode();  // and a connection made after it
  ASSERT_NE(late, nullptr);
  auto reply = Await(late->Call(server_->visible_address(), "echo", Message("late")));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  for (const auto& peer : server_->ConnectedPeers()) {
    EXPECT_TRUE(peer == honest_->peer_id() || peer == late->peer_id()) << peer.ToString();
  }
}

TEST_F(HostilePeerTest, MalformedFramesFromAnAuthenticatedPeerAreSurvived) {
  Identity keys = Identity::Generate();
  RawPeer raw(server_->visible_address(), &keys);
  raw.SendHello(keys.peer_id());
  auto ack = raw.Receive(Milliseconds(5000));
  ASSERT_TRUE(ack.has_value()) << "no answer to the HELLO";
  ASSERT_EQ(ack->envelope.kind(), wire::HELLO_ACK);
  ASSERT_EQ(ack->envelope.status().code(), 0u) << ack->envelope.status().message();
  EXPECT_EQ(ack->envelope.hello().peer_id(), std::string(server_->peer_id().raw()));

  // 1. Not a protobuf at all (field number 0 is invalid).
  std::string unparseable("\x00\x01\x02\x03garbage", 11);
  ASSERT_FALSE(wire::Envelope().ParseFromString(unparseable));
  raw.SendFrames({unparseable});
  raw.SendFrames({unparseable, "with a payload frame"});
  // 2. Declared payload sizes that do not match the frames.
  wire::Envelope mismatch = Request(101, "echo", "mismatch");
  mismatch.add_payload_sizes(100);
  mismatch.add_payload_sizes(200);
  raw.Send(mismatch, {std::string(50, 'm')});
  wire::Envelope surplus = Request(102, "echo", "surplus", {"abc"});
  raw.Send(surplus, {"abc", "unexpected extra frame"});
  // 3. An unknown kind (99): written by hand, since the enum has no such value.
  wire::Envelope unknown;
  unknown.set_call_id(103);
  unknown.set_from_caller(true);
  raw.SendFrames({std::string("\x08\x63", 2) + unknown.SerializeAsString(), "x"});
  // 4. A CONTINUATION of a call that does not exist.
  wire::Envelope continuation;
  continuation.set_kind(wire::CONTINUATION);
  continuation.set_call_id(104);
  continuation.set_from_caller(true);
  continuation.set_chunk_index(1);
  raw.Send(continuation, {"orphan chunk"});
  // 5. Sizes beyond any limit, and more chunks than bytes.
  wire::Envelope enormous = Request(105, "echo", "enormous");
  enormous.add_payload_sizes(uint64_t{1} << 50);
  raw.Send(enormous, {"tiny"});
  wire::Envelope too_many_chunks = Request(106, "echo", "chunks", {"0123456789"});
  too_many_chunks.set_chunk_count(1000000);
  raw.Send(too_many_chunks, {"0123456789"});
  // 6. Stream traffic, a cancel and credit for calls that do not exist.
  wire::Envelope data;
  data.set_kind(wire::STREAM_DATA);
  data.set_call_id(107);
  data.set_from_caller(true);
  raw.Send(data, {"nobody reads this"});
  wire::Envelope cancel;
  cancel.set_kind(wire::CANCEL);
  cancel.set_call_id(108);
  cancel.set_from_caller(true);
  raw.Send(cancel);
  wire::Envelope credit;
  credit.set_kind(wire::CREDIT);
  credit.set_call_id(109);
  credit.set_credits(1000000);
  raw.Send(credit);
  // 7. A second HELLO.
  raw.SendHello(keys.peer_id());

  // A valid request on the same connection is still served.
  raw.Send(Request(7, "echo", "valid", {"abc"}), {"abc"});
  std::vector<Received> others;
  auto response = raw.ReceiveResponse(7, Milliseconds(5000), &others);
  ASSERT_TRUE(response.has_value()) << "no RESPONSE to a valid request after malformed frames";
  EXPECT_EQ(response->envelope.status().code(), 0u) << response->envelope.status().message();
  EXPECT_EQ(response->envelope.header(), "valid");
  ASSERT_EQ(response->payloads.size(), 1u);
  EXPECT_EQ(response->payloads[0], "abc");
  for (const auto& message : others) {
    if (message.envelope.kind() == wire::RESPONSE) {
      EXPECT_NE(message.envelope.status().code(), 0u)
          << "a malformed request (call " << message.envelope.call_id() << ") was answered as OK";
    }
  }
  EXPECT_EQ(echo_calls_->load(), 1) << "a malformed request reached the handler";
  ExpectHonestCallWorks();
}

TEST_F(HostilePeerTest, PlaintextRawPeerCannotReachAnEncryptedNode) {
  RawPeer raw(server_->visible_address(), nullptr);
  Identity keys = Identity::Generate();
  raw.SendHello(keys.peer_id());
  raw.Send(Request(1, "echo", "plain"));
  EXPECT_FALSE(raw.Receive(Milliseconds(1000)).has_value());
  EXPECT_EQ(echo_calls_->load(), 0);
  ExpectHonestCallWorks();
}

// ---------------------------------------------------------------------------------------------
// Client mode.

TEST(ClientModeTest, ServerCallsBackAClientModeNodeOverItsConnection) {
  auto server = StartNode();
  ASSERT_NE(server, nullptr);
  test::RegisterEcho(*server);
  NodeOptions client_options = TestNodeOptions();
  client_options.client_mode = true;
  auto client = StartNode(client_options);
  ASSERT_NE(client, nullptr);
  client->RegisterUnary("whoami", [](const CallContext& context, Message, Responder respond) {
    respond(Message("client answering " + context.peer.ToString()));
  });

  EXPECT_TRUE(client->visible_address().endpoints.empty());
  EXPECT_EQ(client->visible_address().peer_id, client->peer_id());

  auto reply = Await(client->Call(server->visible_address(), "echo", Message("hi")));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, "hi");

  auto back = Await(server->Call(PeerAddress{client->peer_id(), {}}, "whoami", Message()));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->header, "client answering " + server->peer_id().ToString());
}

TEST(ClientModeTest, ServerOpensAStreamToAClientModeNode) {
  auto server = StartNode();
  ASSERT_NE(server, nullptr);
  test::RegisterEcho(*server);
  NodeOptions client_options = TestNodeOptions();
  client_options.client_mode = true;
  auto client = StartNode(client_options);
  ASSERT_NE(client, nullptr);
  client->RegisterStream("numbers", [](const CallContext&, Stream& stream) {
    for (int i = 0; i < 3; ++i)
      stream.Write(Message(std::to_string(i))).WaitFor(Milliseconds(5000));
    return Status::Ok();
  });
  ASSERT_TRUE(Await(client->Call(server->visible_address(), "echo", Message("hi"))).ok());

  auto stream = server->OpenStream(PeerAddress{client->peer_id(), {}}, "numbers");
  for (int i = 0; i < 3; ++i) {
    auto next = Await(stream->Read());
    ASSERT_TRUE(next.ok()) << next.status().ToString();
    ASSERT_TRUE(next->has_value());
    EXPECT_EQ((*next)->header, std::to_string(i));
  }
  auto end = Await(stream->Read());
  ASSERT_TRUE(end.ok()) << end.status().ToString();
  EXPECT_FALSE(end->has_value());
}

TEST(ClientModeTest, ClientModeNodeListensNowhere) {
  NodeOptions options = TestNodeOptions();
  options.client_mode = true;
  auto client = StartNode(options);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(client->visible_address().endpoints.empty());
  EXPECT_TRUE(client->visible_address().ToStrings().empty());
}

}  // namespace
}  // namespace hivemind::net

int main(int argc, char** argv) {
  if (const char* role = std::getenv(hivemind::net::kRoleVariable)) {
    return hivemind::net::RunPeer(role);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
