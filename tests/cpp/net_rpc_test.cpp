// Unary calls between nodes on loopback: replies, errors, concurrency, connection reuse, deadlines,
// cancellation, shutdown, addresses and encryption settings.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <stdexcept>
#include <thread>

#include "net/node.h"
#include "test_util.h"

namespace hivemind::net {
namespace {

using test::Await;
using test::Clock;
using test::MakeMessage;
using test::Notification;
using test::SecondsSince;
using test::StartNode;
using test::TestNodeOptions;

// A handler that keeps every call open: it stores the responder and the context. Held by a
// shared_ptr that the registered handler shares, so a late handler never sees it destroyed.
struct HangingHandler : std::enable_shared_from_this<HangingHandler> {
  std::mutex mutex;
  std::vector<Responder> responders;
  std::vector<CallContext> contexts;
  Notification started;

  UnaryHandler AsHandler() {
    return [self = shared_from_this()](const CallContext& context, Message, Responder respond) {
      {
        std::lock_guard<std::mutex> lock(self->mutex);
        self->responders.push_back(std::move(respond));
        self->contexts.push_back(context);
      }
      self->started.Notify();
    };
  }
  CallContext FirstContext() {
    std::lock_guard<std::mutex> lock(mutex);
    return contexts.at(0);
  }
  Responder FirstResponder() {
    std::lock_guard<std::mutex> lock(mutex);
    return responders.at(0);
  }
};

// A TCP port on 127.0.0.1 where nothing listens (bound, then released).
uint16_t UnusedPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  socklen_t length = sizeof(address);
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length), 0);
  ::close(fd);
  return ntohs(address.sin_port);
}

class RpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartNode();
    ASSERT_NE(server_, nullptr);
    test::RegisterEcho(*server_);
    client_ = StartNode();
    ASSERT_NE(client_, nullptr);
  }

  std::unique_ptr<Node> server_;
  std::unique_ptr<Node> client_;
};

TEST_F(RpcTest, UnaryCallCarriesHeaderAndPayloadsIntact) {
  std::string binary = test::PatternString(100000, 1);
  binary[10] = '\0';
  Message request =
      MakeMessage(std::string("head\0er", 7), {"", "a", binary, std::string(3, '\0')});
  auto reply = Await(client_->Call(server_->visible_address(), "echo", request));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, std::string("head\0er", 7));
  ASSERT_EQ(reply->payloads.size(), 4u);
  EXPECT_EQ(reply->payloads[0].ToString(), "");
  EXPECT_EQ(reply->payloads[1].ToString(), "a");
  EXPECT_EQ(reply->payloads[2].ToString(), binary);
  EXPECT_EQ(reply->payloads[3].ToString(), std::string(3, '\0'));
}

TEST_F(RpcTest, HandlerSeesTheAuthenticatedCallerAndMethod) {
  Promise<CallContext> seen_context;
  server_->RegisterUnary("whoami",
                         [seen_context](const CallContext& context, Message, Responder respond) {
                           seen_context.Set(context);
                           respond(Message(context.peer.ToString()));
                         });
  auto before = Clock::now();
  auto reply = Await(client_->Call(server_->visible_address(), "whoami", Message(),
                                   CallOptions{Milliseconds(3000)}));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, client_->peer_id().ToString());
  auto seen = Await(seen_context.future());
  ASSERT_TRUE(seen.ok());
  EXPECT_EQ(seen->peer, client_->peer_id());
  EXPECT_EQ(seen->method, "whoami");
  EXPECT_GT(seen->deadline, before + Milliseconds(2000));
  EXPECT_LT(seen->deadline, Clock::now() + Milliseconds(3100));
  EXPECT_FALSE(seen->IsCancelled());
}

TEST_F(RpcTest, RemoteErrorKeepsItsCodeAndMessage) {
  server_->RegisterUnary("fail", [](const CallContext&, Message, Responder respond) {
    respond(Status(StatusCode::kFailedPrecondition, "no tensor named layer3.weight"));
  });
  auto reply = Await(client_->Call(server_->visible_address(), "fail", Message("x")));
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kFailedPrecondition) << reply.status().ToString();
  EXPECT_NE(reply.status().message().find("no tensor named layer3.weight"), std::string::npos)
      << reply.status().ToString();
}

TEST_F(RpcTest, UnknownMethodIsNotFound) {
  auto reply = Await(client_->Call(server_->visible_address(), "no_such_method", Message("x")));
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kNotFound) << reply.status().ToString();
  EXPECT_NE(reply.status().message().find("no_such_method"), std::string::npos)
      << reply.status().ToString();
}

TEST_F(RpcTest, ThrowingHandlerGivesInternalAndTheNodeKeepsServing) {
  server_->RegisterUnary("throws", [](const CallContext&, Message, Responder) {
    throw std::runtime_error("handler exploded");
  });
  for (int i = 0; i < 3; ++i) {
    auto reply = Await(client_->Call(server_->visible_address(), "throws", Message("x")));
    ASSERT_FALSE(reply.ok());
    EXPECT_EQ(reply.status().code(), StatusCode::kInternal) << reply.status().ToString();
  }
  auto echoed = Await(client_->Call(server_->visible_address(), "echo", Message("still here")));
  ASSERT_TRUE(echoed.ok()) << echoed.status().ToString();
  EXPECT_EQ(echoed->header, "still here");
}

TEST_F(RpcTest, HandlerMayRespondFromAnotherThreadAfterReturning) {
  // Whoever drops the last reference joins the responding threads.
  struct Threads {
    std::mutex mutex;
    std::vector<std::thread> list;
    ~Threads() {
      for (auto& thread : list) thread.join();
    }
  };
  auto threads = std::make_shared<Threads>();
  server_->RegisterUnary(
      "later", [threads](const CallContext&, Message request, Responder respond) {
        std::lock_guard<std::mutex> lock(threads->mutex);
        threads->list.emplace_back(
            [request = std::move(request), respond = std::move(respond)]() mutable {
              respond(Message("later:" + request.header));
            });
      });
  auto reply = Await(client_->Call(server_->visible_address(), "later", Message("x")));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, "later:x");
}

TEST_F(RpcTest, RegisteringTwiceReplacesTheHandler) {
  server_->RegisterUnary("v", [](const CallContext&, Message, Responder r) { r(Message("1")); });
  server_->RegisterUnary("v", [](const CallContext&, Message, Responder r) { r(Message("2")); });
  auto reply = Await(client_->Call(server_->visible_address(), "v", Message()));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, "2");
}

TEST_F(RpcTest, TwoHundredConcurrentCallsFromSeveralClientsAllGetTheirOwnReply) {
  constexpr int kClients = 4;
  constexpr int kCallsPerClient = 50;
  std::vector<std::unique_ptr<Node>> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.push_back(StartNode());
    ASSERT_NE(clients.back(), nullptr);
  }
  std::vector<std::vector<Future<Message>>> futures(kClients);
  std::vector<std::thread> threads;
  Notification go;
  PeerAddress server = server_->visible_address();
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      go.WaitFor(Milliseconds(5000));
      for (int i = 0; i < kCallsPerClient; ++i) {
        std::string tag = std::to_string(c) + "/" + std::to_string(i);
        futures[c].push_back(clients[c]->Call(
            server, "echo", MakeMessage(tag, {test::PatternString(100 + i * 37, c * 1000 + i)})));
      }
    });
  }
  go.Notify();
  for (auto& thread : threads) thread.join();
  for (int c = 0; c < kClients; ++c) {
    ASSERT_EQ(futures[c].size(), static_cast<size_t>(kCallsPerClient));
    for (int i = 0; i < kCallsPerClient; ++i) {
      auto reply = Await(futures[c][i], Milliseconds(10000));
      ASSERT_TRUE(reply.ok()) << c << "/" << i << ": " << reply.status().ToString();
      EXPECT_EQ(reply->header, std::to_string(c) + "/" + std::to_string(i));
      ASSERT_EQ(reply->payloads.size(), 1u);
      EXPECT_EQ(reply->payloads[0].ToString(), test::PatternString(100 + i * 37, c * 1000 + i));
    }
  }
}

TEST_F(RpcTest, ManyCallsReuseOneConnectionPerPeerPair) {
  PeerAddress server = server_->visible_address();
  uint16_t port = server.endpoints.at(0).port;
  for (int i = 0; i < 20; ++i) {
    auto reply = Await(client_->Call(server, "echo", Message(std::to_string(i))));
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  }
  std::vector<Future<Message>> futures;
  for (int i = 0; i < 100; ++i) futures.push_back(client_->Call(server, "echo", Message("c")));
  for (auto& future : futures) ASSERT_TRUE(Await(future).ok());

  auto client_peers = client_->ConnectedPeers();
  ASSERT_EQ(client_peers.size(), 1u);
  EXPECT_EQ(client_peers[0], server_->peer_id());
  auto server_peers = server_->ConnectedPeers();
  ASSERT_EQ(server_peers.size(), 1u);
  EXPECT_EQ(server_peers[0], client_->peer_id());
  EXPECT_EQ(test::CountEstablishedConnectionsToPort(port), 1);
}

TEST_F(RpcTest, CallsInTheReverseDirectionWork) {
  test::RegisterEcho(*client_, "client_echo");
  ASSERT_TRUE(Await(client_->Call(server_->visible_address(), "echo", Message("a"))).ok());
  auto reply = Await(server_->Call(client_->visible_address(), "client_echo", Message("back")));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, "back");
}

TEST_F(RpcTest, CallToAKnownPeerWithoutEndpointsUsesTheExistingConnection) {
  ASSERT_TRUE(Await(client_->Call(server_->visible_address(), "echo", Message("a"))).ok());
  PeerAddress by_id_only{server_->peer_id(), {}};
  auto reply = Await(client_->Call(by_id_only, "echo", Message("by id")));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, "by id");
}

TEST_F(RpcTest, CallWithoutEndpointsToAnUnknownPeerFailsPromptly) {
  PeerAddress stranger{Identity::Generate().peer_id(), {}};
  auto start = Clock::now();
  auto reply =
      Await(client_->Call(stranger, "echo", Message("x"), CallOptions{Milliseconds(30000)}));
  ASSERT_FALSE(reply.ok());
  EXPECT_NE(reply.status().code(), StatusCode::kDeadlineExceeded) << reply.status().ToString();
  EXPECT_LT(SecondsSince(start), 3.5);
}

TEST_F(RpcTest, UnansweredCallFailsWithDeadlineExceededNearItsTimeout) {
  auto hanging = std::make_shared<HangingHandler>();
  server_->RegisterUnary("hang", hanging->AsHandler());
  auto start = Clock::now();
  auto reply = Await(client_->Call(server_->visible_address(), "hang", Message("x"),
                                   CallOptions{Milliseconds(500)}));
  double elapsed = SecondsSince(start);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kDeadlineExceeded) << reply.status().ToString();
  EXPECT_GE(elapsed, 0.45);
  EXPECT_LT(elapsed, 1.5);
}

TEST_F(RpcTest, ResponseAfterTheDeadlineIsHarmless) {
  auto hanging = std::make_shared<HangingHandler>();
  server_->RegisterUnary("hang", hanging->AsHandler());
  auto reply = Await(client_->Call(server_->visible_address(), "hang", Message("x"),
                                   CallOptions{Milliseconds(300)}));
  ASSERT_EQ(reply.status().code(), StatusCode::kDeadlineExceeded) << reply.status().ToString();
  ASSERT_TRUE(hanging->started.WaitFor(test::kPromptly));
  hanging->FirstResponder()(Message("too late"));
  auto next = Await(client_->Call(server_->visible_address(), "echo", Message("after")));
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(next->header, "after");
}

TEST_F(RpcTest, DefaultCallTimeoutApplies) {
  NodeOptions options = TestNodeOptions();
  options.default_call_timeout = Milliseconds(400);
  auto impatient = StartNode(options);
  ASSERT_NE(impatient, nullptr);
  auto hanging = std::make_shared<HangingHandler>();
  server_->RegisterUnary("hang", hanging->AsHandler());
  auto start = Clock::now();
  auto reply = Await(impatient->Call(server_->visible_address(), "hang", Message("x")));
  EXPECT_EQ(reply.status().code(), StatusCode::kDeadlineExceeded) << reply.status().ToString();
  EXPECT_LT(SecondsSince(start), 1.4);
}

TEST_F(RpcTest, CancelFailsTheCallPromptlyAndTellsTheHandler) {
  auto hanging = std::make_shared<HangingHandler>();
  server_->RegisterUnary("hang", hanging->AsHandler());
  auto future = client_->Call(server_->visible_address(), "hang", Message("x"),
                              CallOptions{Milliseconds(20000)});
  ASSERT_TRUE(hanging->started.WaitFor(test::kPromptly));
  CallContext context = hanging->FirstContext();
  EXPECT_FALSE(context.IsCancelled());

  auto cancelled_at = Clock::now();
  future.Cancel();
  auto reply = Await(future, Milliseconds(2000));
  EXPECT_LT(SecondsSince(cancelled_at), 0.5);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kCancelled) << reply.status().ToString();

  EXPECT_TRUE(test::WaitUntil([&] { return context.IsCancelled(); }, Milliseconds(2000)))
      << "the server's CallContext never saw the cancellation";
  // Answering a cancelled call is allowed and harmless.
  hanging->FirstResponder()(Message("ignored"));
  EXPECT_TRUE(Await(client_->Call(server_->visible_address(), "echo", Message("y"))).ok());
}

TEST_F(RpcTest, CancelAfterCompletionChangesNothing) {
  auto future = client_->Call(server_->visible_address(), "echo", Message("done"));
  auto reply = Await(future);
  ASSERT_TRUE(reply.ok());
  future.Cancel();
  auto again = Await(future);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->header, "done");
}

TEST_F(RpcTest, CallToAnAddressWhereNothingListensIsUnavailableAtOnce) {
  // A refused connection fails the call right away, long before connect_timeout: a dead peer's
  // address must not cost its callers seconds (the DHT benchmark found this).
  NodeOptions options = TestNodeOptions();
  options.connect_timeout = Milliseconds(10000);
  auto caller = StartNode(options);
  ASSERT_NE(caller, nullptr);
  auto nowhere = PeerAddress::Parse("/ip4/127.0.0.1/tcp/" + std::to_string(UnusedPort()) + "/p2p/" +
                                    Identity::Generate().peer_id().ToString());
  ASSERT_TRUE(nowhere.ok()) << nowhere.status().ToString();
  auto start = Clock::now();
  auto reply =
      Await(caller->Call(*nowhere, "echo", Message("x"), CallOptions{Milliseconds(30000)}));
  double elapsed = SecondsSince(start);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kUnavailable) << reply.status().ToString();
  EXPECT_NE(reply.status().message().find("nothing accepts connections"), std::string::npos)
      << reply.status().ToString();
  EXPECT_LT(elapsed, 2.0);
}

TEST_F(RpcTest, CallsToAPeerThatShutDownKeepFailingAtOnce) {
  NodeOptions options = TestNodeOptions();
  options.connect_timeout = Milliseconds(10000);
  auto server = StartNode(options);
  ASSERT_NE(server, nullptr);
  test::RegisterEcho(*server);
  PeerAddress address = server->visible_address();
  ASSERT_TRUE(Await(client_->Call(address, "echo", Message("x"))).ok());
  server->Shutdown();
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto start = Clock::now();
    auto reply =
        Await(client_->Call(address, "echo", Message("x"), CallOptions{Milliseconds(30000)}));
    ASSERT_FALSE(reply.ok());
    EXPECT_EQ(reply.status().code(), StatusCode::kUnavailable) << reply.status().ToString();
    EXPECT_LT(SecondsSince(start), 2.0) << "attempt " << attempt;
  }
}

TEST_F(RpcTest, ShutdownFailsPendingCallsWithCancelled) {
  auto hanging = std::make_shared<HangingHandler>();
  server_->RegisterUnary("hang", hanging->AsHandler());
  auto future = client_->Call(server_->visible_address(), "hang", Message("x"),
                              CallOptions{Milliseconds(30000)});
  ASSERT_TRUE(hanging->started.WaitFor(test::kPromptly));
  auto start = Clock::now();
  client_->Shutdown();
  auto reply = Await(future, Milliseconds(2000));
  EXPECT_LT(SecondsSince(start), 1.5);
  ASSERT_FALSE(reply.ok());
  EXPECT_EQ(reply.status().code(), StatusCode::kCancelled) << reply.status().ToString();
}

TEST_F(RpcTest, ShutdownIsIdempotentAndLaterCallsFail) {
  ASSERT_TRUE(Await(client_->Call(server_->visible_address(), "echo", Message("x"))).ok());
  client_->Shutdown();
  client_->Shutdown();
  auto reply =
      Await(client_->Call(server_->visible_address(), "echo", Message("x")), Milliseconds(2000));
  EXPECT_FALSE(reply.ok());
  client_.reset();  // the destructor after Shutdown must not hang or crash either
}

TEST_F(RpcTest, ServerShutdownFailsTheCallersPendingCallPromptly) {
  auto hanging = std::make_shared<HangingHandler>();
  server_->RegisterUnary("hang", hanging->AsHandler());
  auto future = client_->Call(server_->visible_address(), "hang", Message("x"),
                              CallOptions{Milliseconds(30000)});
  ASSERT_TRUE(hanging->started.WaitFor(test::kPromptly));
  auto start = Clock::now();
  server_->Shutdown();
  auto reply = Await(future, Milliseconds(5000));
  EXPECT_LT(SecondsSince(start), 2.5);
  ASSERT_FALSE(reply.ok());
  EXPECT_TRUE(reply.status().code() == StatusCode::kUnavailable ||
              reply.status().code() == StatusCode::kCancelled)
      << reply.status().ToString();
}

TEST_F(RpcTest, VisibleAddressParsesAndNamesThisPeer) {
  PeerAddress visible = server_->visible_address();
  EXPECT_EQ(visible.peer_id, server_->peer_id());
  EXPECT_EQ(server_->identity().peer_id(), server_->peer_id());
  ASSERT_FALSE(visible.endpoints.empty());
  EXPECT_EQ(visible.endpoints[0].host, "127.0.0.1");
  EXPECT_NE(visible.endpoints[0].port, 0);
  for (const auto& text : visible.ToStrings()) {
    std::string suffix = "/p2p/" + server_->peer_id().ToString();
    ASSERT_GE(text.size(), suffix.size());
    EXPECT_EQ(text.substr(text.size() - suffix.size()), suffix) << text;
  }
  auto parsed = PeerAddress::ParseList(visible.ToString());
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->peer_id, server_->peer_id());
  EXPECT_EQ(parsed->endpoints, visible.endpoints);
}

TEST_F(RpcTest, NodeUsesTheGivenIdentity) {
  NodeOptions options = TestNodeOptions();
  Identity identity = Identity::Generate();
  options.identity = identity;
  auto node = StartNode(options);
  ASSERT_NE(node, nullptr);
  EXPECT_EQ(node->peer_id(), identity.peer_id());
  EXPECT_EQ(node->visible_address().peer_id, identity.peer_id());
}

TEST_F(RpcTest, AnnounceAddressesReplaceTheVisibleAddress) {
  NodeOptions options = TestNodeOptions();
  options.announce_addresses = {"/ip4/127.0.0.1/tcp/41234", "/dns/peer.example.org/tcp/5555"};
  auto node = StartNode(options);
  ASSERT_NE(node, nullptr);
  PeerAddress visible = node->visible_address();
  EXPECT_EQ(visible.peer_id, node->peer_id());
  ASSERT_EQ(visible.endpoints.size(), 2u);
  EXPECT_EQ(visible.endpoints[0].ToString(), "/ip4/127.0.0.1/tcp/41234");
  EXPECT_EQ(visible.endpoints[1].ToString(), "/dns/peer.example.org/tcp/5555");
  EXPECT_EQ(visible.ToStrings()[1],
            "/dns/peer.example.org/tcp/5555/p2p/" + node->peer_id().ToString());
}

TEST_F(RpcTest, MalformedListenAddressFailsStart) {
  NodeOptions options = TestNodeOptions();
  options.listen_addresses = {"/ip4/127.0.0.1/tcp/notaport"};
  auto node = Node::Start(options);
  ASSERT_FALSE(node.ok());
  EXPECT_EQ(node.status().code(), StatusCode::kInvalidArgument) << node.status().ToString();
}

TEST(RpcEncryptionTest, PlaintextOnBothSidesWorks) {
  NodeOptions options = TestNodeOptions();
  options.encryption = false;
  auto server = StartNode(options);
  auto client = StartNode(options);
  ASSERT_NE(server, nullptr);
  ASSERT_NE(client, nullptr);
  test::RegisterEcho(*server);
  auto reply = Await(client->Call(server->visible_address(), "echo", MakeMessage("p", {"xyz"})));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  EXPECT_EQ(reply->header, "p");
  ASSERT_EQ(reply->payloads.size(), 1u);
  EXPECT_EQ(reply->payloads[0].ToString(), "xyz");
}

// One side encrypted and the other not: the call fails within the connect timeout, not at its
// deadline, and says why.
void ExpectMismatchFailsClearly(bool client_encrypts) {
  NodeOptions server_options = TestNodeOptions();
  server_options.encryption = !client_encrypts;
  NodeOptions client_options = TestNodeOptions();
  client_options.encryption = client_encrypts;
  auto server = StartNode(server_options);
  auto client = StartNode(client_options);
  ASSERT_NE(server, nullptr);
  ASSERT_NE(client, nullptr);
  test::RegisterEcho(*server);
  auto start = Clock::now();
  auto reply = Await(client->Call(server->visible_address(), "echo", Message("x"),
                                  CallOptions{Milliseconds(30000)}));
  ASSERT_FALSE(reply.ok());
  EXPECT_NE(reply.status().code(), StatusCode::kDeadlineExceeded) << reply.status().ToString();
  EXPECT_FALSE(reply.status().message().empty());
  EXPECT_LT(SecondsSince(start), 2.0 + 1.5) << reply.status().ToString();
}

TEST(RpcEncryptionTest, EncryptedClientToPlaintextServerFailsClearly) {
  ExpectMismatchFailsClearly(/*client_encrypts=*/true);
}

TEST(RpcEncryptionTest, PlaintextClientToEncryptedServerFailsClearly) {
  ExpectMismatchFailsClearly(/*client_encrypts=*/false);
}

TEST(RpcEncryptionTest, ServerThatDoesNotHoldTheExpectedKeyIsRefused) {
  auto server = StartNode();
  auto client = StartNode();
  ASSERT_NE(server, nullptr);
  ASSERT_NE(client, nullptr);
  test::RegisterEcho(*server);
  PeerAddress impostor{Identity::Generate().peer_id(), server->visible_address().endpoints};
  auto start = Clock::now();
  auto reply =
      Await(client->Call(impostor, "echo", Message("secret"), CallOptions{Milliseconds(30000)}));
  ASSERT_FALSE(reply.ok());
  EXPECT_TRUE(reply.status().code() == StatusCode::kUnavailable ||
              reply.status().code() == StatusCode::kPermissionDenied)
      << reply.status().ToString();
  EXPECT_LT(SecondsSince(start), 2.0 + 1.5);
  // The real peer id still works afterwards.
  auto honest = Await(client->Call(server->visible_address(), "echo", Message("ok")));
  EXPECT_TRUE(honest.ok()) << honest.status().ToString();
}

TEST(RpcEncryptionTest, PlaintextServerAnsweringForAnotherIdIsRefused) {
  NodeOptions options = TestNodeOptions();
  options.encryption = false;
  auto server = StartNode(options);
  auto client = StartNode(options);
  ASSERT_NE(server, nullptr);
  ASSERT_NE(client, nullptr);
  test::RegisterEcho(*server);
  PeerAddress impostor{Identity::Generate().peer_id(), server->visible_address().endpoints};
  auto start = Clock::now();
  auto reply =
      Await(client->Call(impostor, "echo", Message("x"), CallOptions{Milliseconds(30000)}));
  ASSERT_FALSE(reply.ok());
  EXPECT_TRUE(reply.status().code() == StatusCode::kUnavailable ||
              reply.status().code() == StatusCode::kPermissionDenied)
      << reply.status().ToString();
  EXPECT_LT(SecondsSince(start), 2.0 + 1.5);
}

}  // namespace
}  // namespace hivemind::net
