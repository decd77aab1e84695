// The DHT over real ZeroMQ sockets on 127.0.0.1 (dht/net_transport.h): a swarm of 16 nodes,
// failures, record semantics, and requests that break the protocol. Time jumps use an injected
// clock shared by the nodes, never sleeps.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <random>

#include "dht/dht_node.h"
#include "dht/net_transport.h"
#include "net/node.h"
#include "proto/dht.pb.h"

namespace hivemind::dht {
namespace {

using std::chrono::milliseconds;
constexpr auto kWait = std::chrono::seconds(30);  // bound on every wait; operations end far sooner

// The wall clock plus an offset the test can move forward.
class OffsetClock : public Clock {
 public:
  DhtTime Now() const override { return system_.Now() + offset_.load(); }
  void Advance(double seconds) { offset_.store(offset_.load() + seconds); }

 private:
  SystemClock system_;
  std::atomic<double> offset_{0};
};

template <class T>
Result<T> Await(const Future<T>& future) {
  auto result = future.WaitFor(kWait);
  if (!result) return Status(StatusCode::kDeadlineExceeded, "test wait bound passed");
  return *result;
}

net::NodeOptions NodeOptionsFor(bool client_mode) {
  net::NodeOptions options;
  options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};
  options.client_mode = client_mode;
  options.connect_timeout = milliseconds(1000);
  options.worker_threads = 1;
  return options;
}

// One process-local peer: a transport node and the DHT node on top of it.
struct Peer {
  std::unique_ptr<net::Node> node;
  std::shared_ptr<NetDhtTransport> transport;
  std::shared_ptr<DhtNode> dht;

  ~Peer() { Stop(); }
  void Stop() {
    if (node) node->Shutdown();  // fails pending calls, so nothing refers to the DHT node after
    dht.reset();
    transport.reset();
  }
};

std::unique_ptr<Peer> StartPeer(std::shared_ptr<const Clock> clock, bool client_mode = false,
                                DhtOptions options = {}) {
  auto peer = std::make_unique<Peer>();
  auto node = net::Node::Start(NodeOptionsFor(client_mode));
  EXPECT_TRUE(node.ok()) << node.status().ToString();
  if (!node.ok()) return nullptr;
  peer->node = std::move(node).value();
  NetTransportOptions transport_options;
  transport_options.call_timeout = milliseconds(2000);
  peer->transport = std::make_shared<NetDhtTransport>(peer->node.get(), transport_options);
  options.client_mode = client_mode;
  peer->dht =
      DhtNode::Create(NetDhtTransport::SelfContact(*peer->node), peer->transport, clock, options);
  if (!client_mode) peer->transport->Serve(peer->dht);
  return peer;
}

std::string ValueOf(const Result<GetOutcome>& outcome) {
  if (!outcome.ok()) return "<error " + outcome.status().ToString() + ">";
  if (!outcome->value || !outcome->value->regular()) return "<none>";
  return outcome->value->regular()->value;
}

class DhtNetTest : public ::testing::Test {
 protected:
  void StartSwarm(size_t size) {
    for (size_t i = 0; i < size; ++i) {
      peers_.push_back(StartPeer(clock_));
      ASSERT_NE(peers_.back(), nullptr);
      if (i == 0) continue;
      auto joined =
          Await(peers_[i]->dht->Bootstrap({peers_[i - 1]->dht->self(), peers_[0]->dht->self()}));
      ASSERT_TRUE(joined.ok()) << joined.status().ToString();
    }
  }
  DhtNode& dht(size_t i) { return *peers_[i]->dht; }

  std::shared_ptr<OffsetClock> clock_ = std::make_shared<OffsetClock>();
  std::vector<std::unique_ptr<Peer>> peers_;
};

TEST_F(DhtNetTest, SixteenNodesStoreAndGetAndSurviveTenPercentDying) {
  StartSwarm(16);
  const int kKeys = 24;
  for (int k = 0; k < kKeys; ++k) {
    auto stored = Await(dht(k % 16).Store("key" + std::to_string(k), "value" + std::to_string(k),
                                          clock_->Now() + 600));
    ASSERT_TRUE(stored.ok()) << stored.status().ToString();
    EXPECT_TRUE(stored->status.ok()) << stored->status.ToString();
    EXPECT_EQ(stored->replicas, 5u);
  }
  for (int k = 0; k < kKeys; ++k) {
    EXPECT_EQ(ValueOf(Await(dht((k + 7) % 16).Get("key" + std::to_string(k)))),
              "value" + std::to_string(k));
  }
  // Two of sixteen nodes go down.
  peers_[3]->Stop();
  peers_[11]->Stop();
  for (int k = 0; k < kKeys; ++k) {
    const size_t reader = (k % 2 == 0) ? 5 : 14;
    EXPECT_EQ(ValueOf(Await(dht(reader).Get("key" + std::to_string(k)))),
              "value" + std::to_string(k))
        << "key" << k;
  }
}

TEST_F(DhtNetTest, SubkeysMergeLatestWinsAndRecordsExpire) {
  StartSwarm(8);
  const DhtTime t = clock_->Now();
  ASSERT_TRUE(Await(dht(1).Store("swarm", "one", t + 100, std::string("peer1")))->status.ok());
  ASSERT_TRUE(Await(dht(2).Store("swarm", "two", t + 200, std::string("peer2")))->status.ok());
  auto merged = Await(dht(6).Get("swarm", /*latest=*/true));
  ASSERT_TRUE(merged.ok() && merged->value);
  ASSERT_EQ(merged->value->dictionary().size(), 2u);
  EXPECT_EQ(merged->value->dictionary().at("peer1").value, "one");
  EXPECT_EQ(merged->value->dictionary().at("peer2").value, "two");

  ASSERT_TRUE(Await(dht(3).Store("version", "v1", t + 100))->status.ok());
  ASSERT_TRUE(Await(dht(4).Store("version", "v2", t + 300))->status.ok());
  auto older = Await(dht(5).Store("version", "v0", t + 50));
  ASSERT_TRUE(older.ok());
  EXPECT_EQ(older->status.code(), StatusCode::kFailedPrecondition) << older->status.ToString();
  EXPECT_EQ(ValueOf(Await(dht(7).Get("version", /*latest=*/true))), "v2");

  clock_->Advance(301);  // every record above has now expired
  EXPECT_EQ(ValueOf(Await(dht(0).Get("version", true))), "<none>");
  auto gone = Await(dht(6).Get("swarm", true));
  ASSERT_TRUE(gone.ok());
  EXPECT_FALSE(gone->value.has_value());
}

TEST_F(DhtNetTest, OversizedValuesAreRefused) {
  StartSwarm(4);
  auto big = Await(dht(1).Store("big", std::string(100 << 10, 'x'), clock_->Now() + 60));
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->status.code(), StatusCode::kResourceExhausted) << big->status.ToString();
  auto far = Await(dht(1).Store("far", "x", clock_->Now() + 365 * 24 * 3600.0));
  ASSERT_TRUE(far.ok());
  EXPECT_EQ(far->status.code(), StatusCode::kInvalidArgument) << far->status.ToString();
  EXPECT_EQ(ValueOf(Await(dht(2).Get("big"))), "<none>");
}

TEST_F(DhtNetTest, ClientModeNodeWorksThroughOutboundConnectionsOnly) {
  StartSwarm(6);
  auto client = StartPeer(clock_, /*client_mode=*/true);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(Await(client->dht->Bootstrap({dht(0).self()})).ok());
  auto stored = Await(client->dht->Store("from-client", "c", clock_->Now() + 60));
  ASSERT_TRUE(stored.ok() && stored->status.ok()) << stored->status.ToString();
  EXPECT_EQ(ValueOf(Await(dht(4).Get("from-client"))), "c");
  EXPECT_EQ(ValueOf(Await(client->dht->Get("from-client"))), "c");
  for (size_t i = 0; i < peers_.size(); ++i) {
    for (const auto& contact : dht(i).KnownContacts()) {
      EXPECT_NE(contact.peer_id, client->dht->self().peer_id);
    }
  }
  client->Stop();
}

TEST_F(DhtNetTest, BootstrapWithNoAnsweringPeerFailsClearly) {
  auto lonely = StartPeer(clock_);
  ASSERT_NE(lonely, nullptr);
  // A peer id nobody holds, at a port where nothing listens.
  auto absent = net::Identity::Generate();
  Contact nobody(absent.peer_id(), {"/ip4/127.0.0.1/tcp/9"});
  auto result = Await(lonely->dht->Bootstrap({nobody}));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(result.status().message().find("none of the 1 initial peers"), std::string::npos)
      << result.status().ToString();
}

// A bare transport node that sends hand-made requests to a DHT node.
class RawCaller {
 public:
  explicit RawCaller(const Contact& target) {
    auto node = net::Node::Start(NodeOptionsFor(/*client_mode=*/true));
    EXPECT_TRUE(node.ok());
    node_ = std::move(node).value();
    address_.peer_id = target.peer_id;
    for (const auto& text : target.addresses)
      address_.endpoints.push_back(*net::Endpoint::Parse(text));
  }
  ~RawCaller() { node_->Shutdown(); }

  Result<net::Message> Call(const char* method, net::Message message) {
    auto reply = node_->Call(address_, method, std::move(message)).WaitFor(kWait);
    if (!reply) return Status(StatusCode::kDeadlineExceeded, "test wait bound passed");
    return *reply;
  }
  Result<net::Message> Call(const char* method, const std::string& header) {
    return Call(method, net::Message(header));
  }

 private:
  std::unique_ptr<net::Node> node_;
  net::PeerAddress address_;
};

void ExpectError(const Result<net::Message>& reply, StatusCode code, const std::string& words) {
  ASSERT_FALSE(reply.ok()) << "expected " << StatusCodeName(code);
  EXPECT_EQ(reply.status().code(), code) << reply.status().ToString();
  EXPECT_NE(reply.status().message().find(words), std::string::npos) << reply.status().ToString();
}

TEST_F(DhtNetTest, MalformedRequestsToEveryMethodGetErrorsAndTheNodeKeepsServing) {
  StartSwarm(3);
  RawCaller caller(dht(0).self());
  const std::string garbage("\xff\xff\xff\xff garbage", 13);

  // Ping
  ExpectError(caller.Call(kPingMethod, garbage), StatusCode::kInvalidArgument, "malformed");
  {
    wire::PingRequest ping;
    for (int i = 0; i < 20; ++i) ping.mutable_sender()->add_addresses("/ip4/1.2.3.4/tcp/1");
    ExpectError(caller.Call(kPingMethod, ping.SerializeAsString()), StatusCode::kResourceExhausted,
                "addresses");
  }
  ExpectError(caller.Call(kPingMethod, net::Message("", {net::Payload::FromString("x")})),
              StatusCode::kInvalidArgument, "payload");

  // Find
  ExpectError(caller.Call(kFindMethod, garbage), StatusCode::kInvalidArgument, "malformed");
  ExpectError(caller.Call(kFindMethod, ""), StatusCode::kInvalidArgument, "no keys");
  {
    wire::FindRequest find;
    find.add_key_ids("short");
    ExpectError(caller.Call(kFindMethod, find.SerializeAsString()), StatusCode::kInvalidArgument,
                "20 bytes");
  }
  {
    wire::FindRequest find;
    for (int i = 0; i < 2000; ++i) find.add_key_ids(std::string(DhtId::OfKey("k").raw()));
    ExpectError(caller.Call(kFindMethod, find.SerializeAsString()), StatusCode::kResourceExhausted,
                "keys");
  }

  // Store
  auto item = [&](wire::StoreRequest& request) {
    auto* out = request.add_items();
    out->set_key_id(std::string(DhtId::OfKey("k").raw()));
    out->mutable_value()->set_value("v");
    out->mutable_value()->set_expiration_time(clock_->Now() + 60);
    return out;
  };
  ExpectError(caller.Call(kStoreMethod, garbage), StatusCode::kInvalidArgument, "malformed");
  ExpectError(caller.Call(kStoreMethod, ""), StatusCode::kInvalidArgument, "no items");
  {
    wire::StoreRequest store;
    item(store)->set_key_id("bad");
    ExpectError(caller.Call(kStoreMethod, store.SerializeAsString()), StatusCode::kInvalidArgument,
                "20 bytes");
  }
  {
    wire::StoreRequest store;
    item(store)->mutable_value()->set_expiration_time(std::nan(""));
    ExpectError(caller.Call(kStoreMethod, store.SerializeAsString()), StatusCode::kInvalidArgument,
                "finite");
  }
  {
    wire::StoreRequest store;
    item(store)->mutable_value()->set_value(std::string(200 << 10, 'x'));
    ExpectError(caller.Call(kStoreMethod, store.SerializeAsString()),
                StatusCode::kResourceExhausted, "value bytes");
  }
  {
    wire::StoreRequest store;
    item(store)->clear_value();
    ExpectError(caller.Call(kStoreMethod, store.SerializeAsString()), StatusCode::kInvalidArgument,
                "no value");
  }
  {
    wire::StoreRequest store;
    item(store)->set_raw_key("not the key");
    ExpectError(caller.Call(kStoreMethod, store.SerializeAsString()), StatusCode::kInvalidArgument,
                "raw key");
  }
  {
    wire::StoreRequest store;
    for (int i = 0; i < 1500; ++i) item(store);
    ExpectError(caller.Call(kStoreMethod, store.SerializeAsString()),
                StatusCode::kResourceExhausted, "items");
  }
  {
    // Well-formed but out of range: refused per item, with the reason.
    wire::StoreRequest store;
    item(store)->mutable_value()->set_expiration_time(clock_->Now() - 10);
    item(store)->mutable_value()->set_expiration_time(clock_->Now() + 1e9);
    auto reply = caller.Call(kStoreMethod, store.SerializeAsString());
    ASSERT_TRUE(reply.ok()) << reply.status().ToString();
    wire::StoreResponse response;
    ASSERT_TRUE(response.ParseFromString(reply->header));
    ASSERT_EQ(response.errors_size(), 2);
    EXPECT_NE(response.errors(0).find("expired"), std::string::npos) << response.errors(0);
    EXPECT_NE(response.errors(1).find("cap"), std::string::npos) << response.errors(1);
  }

  // After all that, the node still works for everyone, and the raw caller (a client) is not in its
  // routing table.
  ASSERT_TRUE(Await(dht(1).Store("still", "alive", clock_->Now() + 60))->status.ok());
  EXPECT_EQ(ValueOf(Await(dht(2).Get("still"))), "alive");
  auto ping = caller.Call(kPingMethod, wire::PingRequest().SerializeAsString());
  ASSERT_TRUE(ping.ok()) << ping.status().ToString();
  EXPECT_EQ(dht(0).Stats().routing_table_size, 2u);
}

}  // namespace
}  // namespace hivemind::dht
