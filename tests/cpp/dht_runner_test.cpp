// DhtRunner (dht/dht_runner.h): the application-facing DHT peer over real sockets on 127.0.0.1 —
// bootstrap, store/get through several runners, input errors, bootstrap failure and background
// retries, identity persistence, concurrent callers and shutdown while calls are in flight.
#include "dht/dht_runner.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "net/address.h"
#include "net/identity.h"
#include "test_util.h"

namespace hivemind::dht {
namespace {

using std::chrono::milliseconds;

DhtRunnerOptions LocalOptions(std::vector<std::string> initial_peers = {}) {
  DhtRunnerOptions options;
  options.initial_peers = std::move(initial_peers);
  options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};
  options.call_timeout = milliseconds(1000);
  options.bootstrap_timeout = milliseconds(10000);
  options.maintenance_period = milliseconds(100);
  return options;
}

std::unique_ptr<DhtRunner> StartOrFail(DhtRunnerOptions options) {
  auto runner = DhtRunner::Start(std::move(options));
  EXPECT_TRUE(runner.ok()) << runner.status().ToString();
  return runner.ok() ? std::move(runner).value() : nullptr;
}

// Polls `condition` until it holds or `timeout` passes (no fixed sleeps as synchronisation).
template <class Fn>
bool Eventually(Fn condition, milliseconds timeout = milliseconds(10000)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(milliseconds(20));
  }
  return condition();
}

std::string RegularValue(const Result<std::optional<DhtRunnerValue>>& got) {
  if (!got.ok()) return "<error " + got.status().ToString() + ">";
  if (!got.value() || !got.value()->regular) return "<none>";
  return got.value()->regular->value;
}

class DhtRunnerTest : public ::testing::Test {
 protected:
  void StartSwarm(size_t size) {
    runners_.push_back(StartOrFail(LocalOptions()));
    ASSERT_NE(runners_[0], nullptr);
    for (size_t i = 1; i < size; ++i) {
      runners_.push_back(StartOrFail(LocalOptions(runners_[0]->visible_addresses())));
      ASSERT_NE(runners_.back(), nullptr);
    }
  }
  std::vector<std::unique_ptr<DhtRunner>> runners_;
};

TEST_F(DhtRunnerTest, AddressesNamePeerAndStoreGetAcrossRunners) {
  StartSwarm(4);
  const auto addresses = runners_[0]->visible_addresses();
  ASSERT_EQ(addresses.size(), 1u);
  EXPECT_EQ(addresses[0].rfind("/ip4/127.0.0.1/tcp/", 0), 0u) << addresses[0];
  auto parsed = net::PeerAddress::Parse(addresses[0]);
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->peer_id.ToString(), runners_[0]->peer_id());
  for (auto& runner : runners_) EXPECT_GT(runner->Stats().routing_table_size, 0u);

  const DhtTime now = DhtNow();
  auto stored = runners_[1]->Store("model", "weights-v1", now + 60);
  ASSERT_TRUE(stored.ok()) << stored.status().ToString();
  EXPECT_TRUE(stored->status.ok()) << stored->status.ToString();
  EXPECT_GE(stored->replicas, 1u);
  EXPECT_EQ(RegularValue(runners_[3]->Get("model")), "weights-v1");
  EXPECT_EQ(RegularValue(runners_[2]->Get("absent")), "<none>");

  // An older write loses; the runner reports why instead of failing.
  auto older = runners_[2]->Store("model", "weights-v0", now + 30);
  ASSERT_TRUE(older.ok());
  EXPECT_EQ(older->status.code(), StatusCode::kFailedPrecondition) << older->status.ToString();

  // Subkeys from different runners merge into one dictionary.
  ASSERT_TRUE(runners_[1]->Store("swarm", "a", now + 60, std::string("peer-a"))->status.ok());
  ASSERT_TRUE(runners_[2]->Store("swarm", "b", now + 90, std::string("peer-b"))->status.ok());
  auto swarm = runners_[3]->Get("swarm", /*latest=*/true);
  ASSERT_TRUE(swarm.ok() && swarm.value()) << swarm.status().ToString();
  ASSERT_TRUE(swarm.value()->is_dictionary());
  EXPECT_EQ(swarm.value()->dictionary.at("peer-a").value, "a");
  EXPECT_EQ(swarm.value()->dictionary.at("peer-b").value, "b");
  EXPECT_DOUBLE_EQ(swarm.value()->dictionary.at("peer-b").expiration, now + 90);

  size_t stored_somewhere = 0;
  for (auto& runner : runners_) stored_somewhere += runner->Stats().stored_keys;
  EXPECT_GE(stored_somewhere, 2u);
}

TEST_F(DhtRunnerTest, OwnerMarkedRecordsAreSignedByTheirOwner) {
  StartSwarm(3);
  const std::string key = "progress" + runners_[1]->owner_marker();
  const DhtTime now = DhtNow();
  auto mine = runners_[1]->Store(key, "step 10", now + 60);
  ASSERT_TRUE(mine.ok() && mine->status.ok()) << mine->status.ToString();
  EXPECT_EQ(RegularValue(runners_[2]->Get(key, true)), "step 10");  // signature stripped
  auto forged = runners_[2]->Store(key, "step 999", now + 120);
  ASSERT_TRUE(forged.ok());
  EXPECT_FALSE(forged->status.ok());
  EXPECT_EQ(RegularValue(runners_[0]->Get(key, true)), "step 10");
}

TEST_F(DhtRunnerTest, BadInputFailsWithInvalidArgument) {
  StartSwarm(1);
  auto& runner = *runners_[0];
  auto expired = runner.Store("k", "v", DhtNow() - 1);
  ASSERT_FALSE(expired.ok());
  EXPECT_EQ(expired.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(expired.status().message().find("expired"), std::string::npos);
  auto too_far = runner.Store("k", "v", DhtNow() + 7 * 24 * 3600.0);
  ASSERT_FALSE(too_far.ok());
  EXPECT_EQ(too_far.status().code(), StatusCode::kInvalidArgument);
  auto too_big = runner.Store("k", std::string(100 << 10, 'x'), DhtNow() + 60);
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status().code(), StatusCode::kResourceExhausted);

  auto bad_peer = DhtRunner::Start(LocalOptions({"/ip4/127.0.0.1/tcp/5/p2p/not-a-peer-id"}));
  ASSERT_FALSE(bad_peer.ok());
  EXPECT_EQ(bad_peer.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad_peer.status().message().find("bad initial peer"), std::string::npos)
      << bad_peer.status().ToString();

  DhtRunnerOptions bad_listen = LocalOptions();
  bad_listen.listen_addresses = {"/ip4/127.0.0.1/udp/5"};
  EXPECT_FALSE(DhtRunner::Start(bad_listen).ok());

  DhtRunnerOptions bad_option = LocalOptions();
  bad_option.num_replicas = 0;
  auto refused = DhtRunner::Start(bad_option);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
}

// An address where nothing listens, for an identity nobody runs yet.
std::string UnusedPeerAddress(const net::PeerId& peer, uint16_t port) {
  return "/ip4/127.0.0.1/tcp/" + std::to_string(port) + "/p2p/" + peer.ToString();
}

// A port that was free a moment ago (bound by a node that is shut down at once).
uint16_t FreePort() {
  net::NodeOptions options;
  options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};
  auto node = net::Node::Start(options);
  EXPECT_TRUE(node.ok());
  const uint16_t port = (*node)->visible_address().endpoints.at(0).port;
  (*node)->Shutdown();
  return port;
}

TEST_F(DhtRunnerTest, BootstrapFailureIsClearAndRetriedInTheBackground) {
  test::TempDir dir;
  const std::string identity_path = dir.path() + "/bootstrap.key";
  auto identity = net::Identity::LoadOrCreate(identity_path);
  ASSERT_TRUE(identity.ok());
  const uint16_t port = FreePort();
  const std::string address = UnusedPeerAddress(identity->peer_id(), port);

  // Strict: Start fails and names the cause.
  auto strict = DhtRunner::Start(LocalOptions({address}));
  ASSERT_FALSE(strict.ok());
  EXPECT_EQ(strict.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(strict.status().message().find("none of the 1 initial peers"), std::string::npos)
      << strict.status().ToString();

  // Lenient: the node runs, reports the failure, and joins once the peer appears.
  DhtRunnerOptions lenient = LocalOptions({address});
  lenient.ensure_bootstrap_success = false;
  lenient.bootstrap_retry_seconds = 0.2;
  auto waiting = StartOrFail(lenient);
  ASSERT_NE(waiting, nullptr);
  EXPECT_EQ(waiting->Stats().routing_table_size, 0u);
  EXPECT_NE(waiting->Stats().bootstrap_error.find("none of the 1 initial peers"),
            std::string::npos);

  DhtRunnerOptions late = LocalOptions();
  late.identity_path = identity_path;
  late.listen_addresses = {"/ip4/127.0.0.1/tcp/" + std::to_string(port)};
  auto bootstrap = StartOrFail(late);
  ASSERT_NE(bootstrap, nullptr);
  EXPECT_EQ(bootstrap->peer_id(), identity->peer_id().ToString());
  ASSERT_TRUE(Eventually([&] { return waiting->Stats().routing_table_size > 0; }))
      << "the waiting node never joined; last error: " << waiting->Stats().bootstrap_error;
  EXPECT_TRUE(Eventually([&] { return waiting->Stats().bootstrap_error.empty(); }));
  ASSERT_TRUE(waiting->Store("late", "joined", DhtNow() + 60)->status.ok());
  EXPECT_EQ(RegularValue(bootstrap->Get("late")), "joined");
}

TEST_F(DhtRunnerTest, IdentityFilePersistsThePeerId) {
  test::TempDir dir;
  const std::string path = dir.path() + "/node.key";
  DhtRunnerOptions options = LocalOptions();
  options.identity_path = path;
  std::string first_id;
  {
    auto first = StartOrFail(options);
    ASSERT_NE(first, nullptr);
    first_id = first->peer_id();
  }
  struct stat info {};
  ASSERT_EQ(stat(path.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0600u);
  auto second = StartOrFail(options);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(second->peer_id(), first_id);
}

TEST_F(DhtRunnerTest, ClientModeStoresAndGetsWithoutListening) {
  StartSwarm(3);
  DhtRunnerOptions options = LocalOptions(runners_[0]->visible_addresses());
  options.client_mode = true;
  auto client = StartOrFail(options);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(client->visible_addresses().empty());
  ASSERT_TRUE(client->Store("from-client", "c", DhtNow() + 60)->status.ok());
  EXPECT_EQ(RegularValue(runners_[2]->Get("from-client")), "c");
  EXPECT_EQ(client->Stats().stored_keys, 0u);
}

TEST_F(DhtRunnerTest, ManyThreadsThenShutdownWhileCallsAreInFlight) {
  StartSwarm(3);
  constexpr int kThreads = 8;
  constexpr int kOps = 20;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      DhtRunner& runner = *runners_[t % runners_.size()];
      for (int i = 0; i < kOps; ++i) {
        const std::string key = "k" + std::to_string(t) + "-" + std::to_string(i);
        auto stored = runner.Store(key, "v" + std::to_string(i), DhtNow() + 60);
        if (!stored.ok() || !stored->status.ok()) ++failures;
        if (RegularValue(runners_[(t + 1) % runners_.size()]->Get(key)) !=
            "v" + std::to_string(i)) {
          ++failures;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);

  // Shut a runner down while other threads hammer it: every call ends, none crashes.
  std::atomic<bool> stop{false};
  std::atomic<int> after_shutdown_errors{0};
  threads.clear();
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        auto got = runners_[1]->Get("k0-0", /*latest=*/true);
        if (!got.ok() && !runners_[1]->is_running()) ++after_shutdown_errors;
      }
    });
  }
  ASSERT_TRUE(Eventually([&] { return runners_[1]->Stats().routing_table_size > 0; }));
  runners_[1]->Shutdown();
  EXPECT_FALSE(runners_[1]->is_running());
  ASSERT_TRUE(Eventually([&] { return after_shutdown_errors.load() > 0; }));
  stop = true;
  for (auto& thread : threads) thread.join();
  auto late = runners_[1]->Get("k0-0");
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.status().code(), StatusCode::kFailedPrecondition);
  runners_[1]->Shutdown();  // idempotent
  // The others still work without it.
  EXPECT_EQ(RegularValue(runners_[2]->Get("k3-3")), "v3");
}

}  // namespace
}  // namespace hivemind::dht
