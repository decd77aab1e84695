// State transfer: a newcomer downloads a donor's published state, in checksummed chunks, resuming
// with another donor when one fails (shut down, killed, or sending corrupted bytes), and finds
// donors through the DHT.
//
// This file has its own main(): with HIVEMIND_TEST_PEER_ROLE set, the binary is the donor process
// of a test (see RunDonorProcess); otherwise it runs the tests.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <iostream>
#include <set>

#include "averaging/state_directory.h"
#include "averaging/state_donor.h"
#include "averaging/state_download.h"
#include "dht/dht_runner.h"
#include "proto/state_transfer.pb.h"
#include "test_util.h"

namespace hivemind::averaging {
namespace {

using std::chrono::milliseconds;
using test::Await;
using test::ChildProcess;
using test::Clock;
using test::SecondsSince;
using test::StartNode;

constexpr char kRoleVariable[] = "HIVEMIND_TEST_PEER_ROLE";
constexpr size_t kSmallChunk = size_t{256} << 10;
constexpr uint64_t kSharedVersion = 7;

// Three tensors of odd sizes (about 40 MiB in all) and some metadata, all derived from `seed`.
StateSnapshot MakeSnapshot(uint64_t seed) {
  StateSnapshot snapshot;
  snapshot.metadata = test::PatternString(1001, seed);
  const std::vector<std::pair<std::string, size_t>> tensors = {
      {"layer.weight", (size_t{13} << 20) + 12345},
      {"layer.bias", 777},
      {"optimizer.exp_avg", (size_t{27} << 20) - 7}};
  int index = 0;
  for (const auto& [name, size] : tensors) {
    snapshot.tensors.push_back(StateTensor{name,
                                           "uint8",
                                           {static_cast<int64_t>(size)},
                                           net::Payload::FromString(test::PatternString(
                                               size, seed * 10 + static_cast<uint64_t>(index++)))});
  }
  return snapshot;
}

// Failures name what differs rather than printing 40 MiB.
void ExpectSameState(const StateSnapshot& expected, const StateSnapshot& actual) {
  EXPECT_TRUE(expected.metadata == actual.metadata) << "metadata differs";
  ASSERT_EQ(expected.tensors.size(), actual.tensors.size());
  for (size_t i = 0; i < expected.tensors.size(); ++i) {
    const auto& a = expected.tensors[i];
    const auto& b = actual.tensors[i];
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(a.dtype, b.dtype);
    EXPECT_EQ(a.shape, b.shape);
    ASSERT_EQ(a.data.size(), b.data.size()) << a.name;
    EXPECT_EQ(0, std::memcmp(a.data.data(), b.data.data(), a.data.size()))
        << "tensor " << a.name << " differs";
  }
}

std::unique_ptr<StateDonor> StartDonor(net::Node& node, size_t chunk_bytes = size_t{4} << 20,
                                       int max_concurrent = 4) {
  StateDonorOptions options;
  options.chunk_bytes = chunk_bytes;
  options.max_concurrent_downloads = max_concurrent;
  auto donor = StateDonor::Create(node, options);
  EXPECT_TRUE(donor.ok()) << donor.status().ToString();
  return donor.ok() ? std::move(donor).value() : nullptr;
}

StateDownloadOptions QuickOptions() {
  StateDownloadOptions options;
  options.timeout = milliseconds(60000);
  options.message_timeout = milliseconds(10000);
  return options;
}

// ---------------------------------------------------------------------------------------------
// The donor process: serves MakeSnapshot(1) as version kSharedVersion in chunks of kSmallChunk,
// prints its address, and lives until stdin closes (or it is killed).

int RunDonorProcess(const std::string& role) {
  if (role != "donor") {
    std::cerr << "unknown " << kRoleVariable << " '" << role << "'\n";
    return 2;
  }
  auto node = net::Node::Start(test::TestNodeOptions());
  if (!node.ok()) {
    std::cerr << "donor: " << node.status().ToString() << "\n";
    return 1;
  }
  StateDonorOptions options;
  options.chunk_bytes = kSmallChunk;
  auto donor = StateDonor::Create(**node, options);
  if (!donor.ok()) return 1;
  Status published = (*donor)->Publish(MakeSnapshot(1), kSharedVersion);
  if (!published.ok()) {
    std::cerr << "donor: " << published.ToString() << "\n";
    return 1;
  }
  std::cout << (*node)->visible_address().ToString() << std::endl;
  char byte;
  while (::read(STDIN_FILENO, &byte, 1) > 0) {
  }
  (*node)->Shutdown();
  return 0;
}

// ---------------------------------------------------------------------------------------------

TEST(StateTransferTest, DownloadsMultiTensorStateExactly) {
  auto donor_node = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(donor_node, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto donor = StartDonor(*donor_node);
  ASSERT_NE(donor, nullptr);
  StateSnapshot snapshot = MakeSnapshot(3);
  ASSERT_TRUE(donor->Publish(snapshot, 5).ok());

  auto result = DownloadState(
      *newcomer, {StateDonorInfo::FromAddress(donor_node->visible_address())}, QuickOptions());
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  ExpectSameState(snapshot, result->snapshot);
  EXPECT_EQ(result->version, 5u);
  EXPECT_EQ(result->digest, donor->Info()->digest);
  EXPECT_EQ(result->bytes_received, snapshot.TotalBytes());
  ASSERT_EQ(result->attempts.size(), 1u);
  EXPECT_TRUE(result->attempts[0].status.ok());
  EXPECT_EQ(result->restarts, 0);
}

TEST(StateTransferTest, EmptyTensorsAndEmptyMetadataRoundTrip) {
  auto donor_node = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(donor_node, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto donor = StartDonor(*donor_node, 1024);
  ASSERT_NE(donor, nullptr);
  StateSnapshot snapshot;
  snapshot.tensors.push_back(StateTensor::Copy("empty", "float32", {0, 3}, "", 0));
  snapshot.tensors.push_back(StateTensor::Copy("five", "float16", {5}, "abcdefghij", 10));
  snapshot.tensors.push_back(StateTensor::Copy("empty2", "float32", {}, "", 0));
  ASSERT_TRUE(donor->Publish(snapshot, 1).ok());
  auto result = DownloadState(
      *newcomer, {StateDonorInfo::FromAddress(donor_node->visible_address())}, QuickOptions());
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  ExpectSameState(snapshot, result->snapshot);
}

TEST(StateTransferTest, PublishingDuringADownloadKeepsTheOldSnapshotForIt) {
  auto donor_node = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(donor_node, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto donor = StartDonor(*donor_node, kSmallChunk);
  ASSERT_NE(donor, nullptr);
  StateSnapshot old_state = MakeSnapshot(11);
  StateSnapshot new_state = MakeSnapshot(12);
  ASSERT_TRUE(donor->Publish(old_state, 1).ok());

  StateDownloadOptions options = QuickOptions();
  bool republished = false;
  options.on_progress = [&](const StateDownloadProgress& progress) {
    if (republished || progress.verified_bytes < progress.total_bytes / 4) return;
    republished = true;
    // The trainer moves on while the newcomer is a quarter through.
    ASSERT_TRUE(donor->Publish(new_state, 2).ok());
  };
  auto result = DownloadState(
      *newcomer, {StateDonorInfo::FromAddress(donor_node->visible_address())}, options);
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  EXPECT_TRUE(republished);
  EXPECT_EQ(result->version, 1u);
  ExpectSameState(old_state, result->snapshot);

  auto next = DownloadState(*newcomer, {StateDonorInfo::FromAddress(donor_node->visible_address())},
                            QuickOptions());
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(next->version, 2u);
  ExpectSameState(new_state, next->snapshot);
  EXPECT_EQ(donor->version(), 2u);
  EXPECT_EQ(donor->Publish(new_state, 2).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(donor->Publish(new_state, 0).code(), StatusCode::kInvalidArgument);
}

TEST(StateTransferTest, ResumesWithTheSecondDonorWhenTheFirstShutsDown) {
  auto first_node = StartNode();
  auto second_node = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(first_node, nullptr);
  ASSERT_NE(second_node, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto first = StartDonor(*first_node, kSmallChunk);
  auto second = StartDonor(*second_node, kSmallChunk);
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  StateSnapshot snapshot = MakeSnapshot(21);
  ASSERT_TRUE(first->Publish(snapshot, 3).ok());
  ASSERT_TRUE(second->Publish(snapshot, 3).ok());
  ASSERT_EQ(first->Info()->digest, second->Info()->digest);

  StateDownloadOptions options = QuickOptions();
  const net::PeerId first_id = first_node->peer_id();
  bool shut = false;
  options.on_progress = [&](const StateDownloadProgress& progress) {
    if (shut || progress.donor != first_id || progress.verified_bytes < progress.total_bytes / 4)
      return;
    shut = true;
    first_node->Shutdown();
  };
  auto result = DownloadState(*newcomer,
                              {StateDonorInfo::FromAddress(first_node->visible_address()),
                               StateDonorInfo::FromAddress(second_node->visible_address())},
                              options);
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  EXPECT_TRUE(shut);
  ExpectSameState(snapshot, result->snapshot);
  ASSERT_EQ(result->attempts.size(), 2u);
  EXPECT_FALSE(result->attempts[0].status.ok());
  EXPECT_EQ(result->attempts[1].peer, second_node->peer_id());
  EXPECT_GT(result->attempts[1].start_offset, 0u) << "the second donor started from zero";
  EXPECT_TRUE(result->attempts[1].status.ok());
  EXPECT_EQ(result->attempts[0].bytes_verified + result->attempts[1].bytes_verified,
            snapshot.TotalBytes());
  EXPECT_LT(result->bytes_received - snapshot.TotalBytes(), snapshot.TotalBytes());
  EXPECT_EQ(result->restarts, 0);
}

// A donor that relays an honest donor's stream but flips one byte of the third chunk.
void RegisterCorruptingRelay(net::Node& relay, const net::PeerAddress& honest) {
  relay.RegisterStream(
      kStateTransferMethod,
      [&relay, honest](const net::CallContext&, net::Stream& downstream) -> Status {
        auto request = downstream.Read().WaitFor(milliseconds(10000));
        if (!request || !request->ok() || !request->value()) {
          return Status(StatusCode::kInvalidArgument, "relay: no request");
        }
        auto upstream = relay.OpenStream(honest, kStateTransferMethod);
        upstream->Write(std::move(*request->value())).WaitFor(milliseconds(10000));
        upstream->CloseWrite();
        for (int index = 0;; ++index) {
          auto next = upstream->Read().WaitFor(milliseconds(10000));
          if (!next) return Status(StatusCode::kDeadlineExceeded, "relay: upstream silent");
          if (!next->ok()) return next->status();
          if (!next->value()) return Status::Ok();
          net::Message message = std::move(*next->value());
          if (index == 3) {  // manifest, chunk 0, chunk 1, then chunk 2
            std::string bytes = message.payloads.at(0).ToString();
            bytes[bytes.size() / 2] ^= 0x40;
            message.payloads[0] = net::Payload::FromString(std::move(bytes));
          }
          auto written = downstream.Write(std::move(message)).WaitFor(milliseconds(10000));
          if (!written || !written->ok())
            return Status(StatusCode::kCancelled, "relay: write failed");
        }
      });
}

TEST(StateTransferTest, CorruptedChunkIsDetectedAndTheNextDonorFinishes) {
  auto honest_node = StartNode();
  auto relay_node = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(honest_node, nullptr);
  ASSERT_NE(relay_node, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto honest = StartDonor(*honest_node, kSmallChunk);
  ASSERT_NE(honest, nullptr);
  StateSnapshot snapshot = MakeSnapshot(31);
  ASSERT_TRUE(honest->Publish(snapshot, 9).ok());
  RegisterCorruptingRelay(*relay_node, honest_node->visible_address());

  auto result = DownloadState(*newcomer,
                              {StateDonorInfo::FromAddress(relay_node->visible_address()),
                               StateDonorInfo::FromAddress(honest_node->visible_address())},
                              QuickOptions());
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  ExpectSameState(snapshot, result->snapshot);
  ASSERT_EQ(result->attempts.size(), 2u);
  const auto& bad = result->attempts[0];
  EXPECT_EQ(bad.peer, relay_node->peer_id());
  EXPECT_EQ(bad.status.code(), StatusCode::kProtocolError) << bad.status.ToString();
  EXPECT_NE(bad.status.message().find("chunk 2"), std::string::npos) << bad.status.ToString();
  EXPECT_NE(bad.status.message().find("checksum"), std::string::npos) << bad.status.ToString();
  EXPECT_EQ(bad.bytes_verified, 2 * kSmallChunk);
  EXPECT_EQ(result->attempts[1].start_offset, 2 * kSmallChunk);
}

TEST(StateTransferTest, AllDonorsDeadFailsWithinTheTimeoutNamingEachDonor) {
  auto first = StartNode();
  auto second = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto first_address = first->visible_address();
  auto second_address = second->visible_address();
  first->Shutdown();
  second->Shutdown();

  StateDownloadOptions options = QuickOptions();
  options.timeout = milliseconds(8000);
  auto start = Clock::now();
  auto result = DownloadState(
      *newcomer,
      {StateDonorInfo::FromAddress(first_address), StateDonorInfo::FromAddress(second_address)},
      options);
  EXPECT_LT(SecondsSince(start), 8.0);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), StatusCode::kUnavailable) << result.status().ToString();
  EXPECT_NE(result.status().message().find(first_address.peer_id.ToString()), std::string::npos)
      << result.status().ToString();
  EXPECT_NE(result.status().message().find(second_address.peer_id.ToString()), std::string::npos)
      << result.status().ToString();

  auto none = DownloadState(*newcomer, {}, options);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound);
}

TEST(StateTransferTest, SilentDonorIsAbandonedAfterTheMessageTimeout) {
  auto silent = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(silent, nullptr);
  ASSERT_NE(newcomer, nullptr);
  test::Notification release;
  silent->RegisterStream(kStateTransferMethod, [&](const net::CallContext&, net::Stream&) {
    release.WaitFor(milliseconds(10000));
    return Status::Ok();
  });
  StateDownloadOptions options = QuickOptions();
  options.message_timeout = milliseconds(300);
  auto start = Clock::now();
  auto result =
      DownloadState(*newcomer, {StateDonorInfo::FromAddress(silent->visible_address())}, options);
  release.Notify();
  EXPECT_LT(SecondsSince(start), 5.0);
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.status().message().find("no manifest within"), std::string::npos)
      << result.status().ToString();
}

TEST(StateTransferTest, RestartsWithAnotherVersionWhenNoDonorHasTheSameOne) {
  auto old_node = StartNode();
  auto new_node = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(old_node, nullptr);
  ASSERT_NE(new_node, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto old_donor = StartDonor(*old_node, kSmallChunk);
  auto new_donor = StartDonor(*new_node, kSmallChunk);
  ASSERT_NE(old_donor, nullptr);
  ASSERT_NE(new_donor, nullptr);
  ASSERT_TRUE(old_donor->Publish(MakeSnapshot(41), 1).ok());
  StateSnapshot newer = MakeSnapshot(42);
  ASSERT_TRUE(new_donor->Publish(newer, 2).ok());

  StateDownloadOptions options = QuickOptions();
  const net::PeerId old_id = old_node->peer_id();
  bool shut = false;
  options.on_progress = [&](const StateDownloadProgress& progress) {
    if (shut || progress.donor != old_id || progress.verified_bytes < progress.total_bytes / 4)
      return;
    shut = true;
    old_node->Shutdown();
  };
  // Explicit donors are tried in the given order, so the download starts with version 1.
  auto result = DownloadState(*newcomer,
                              {StateDonorInfo::FromAddress(old_node->visible_address()),
                               StateDonorInfo::FromAddress(new_node->visible_address())},
                              options);
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  EXPECT_EQ(result->version, 2u);
  EXPECT_EQ(result->restarts, 1);
  ExpectSameState(newer, result->snapshot);
  ASSERT_EQ(result->attempts.size(), 3u);
  EXPECT_EQ(result->attempts[1].status.code(), StatusCode::kNotFound)
      << result->attempts[1].status.ToString();
  EXPECT_EQ(result->attempts[2].start_offset, 0u);
}

TEST(StateTransferTest, DonorValidatesRequestsAndLimitsConcurrentDownloads) {
  auto donor_node = StartNode();
  auto client = StartNode();
  ASSERT_NE(donor_node, nullptr);
  ASSERT_NE(client, nullptr);
  auto donor = StartDonor(*donor_node, 1024, /*max_concurrent=*/1);
  ASSERT_NE(donor, nullptr);
  const auto address = donor_node->visible_address();

  // Sends a request, returns the status of the first read.
  auto ask = [&](uint64_t version,
                 uint64_t offset) -> std::pair<Status, std::shared_ptr<net::Stream>> {
    auto stream = client->OpenStream(address, kStateTransferMethod);
    wire::StateRequest request;
    request.set_version(version);
    request.set_offset(offset);
    Await(stream->Write(net::Message(request.SerializeAsString())));
    stream->CloseWrite();
    auto first = Await(stream->Read());
    return {first.status(), stream};
  };

  EXPECT_EQ(ask(0, 0).first.code(), StatusCode::kFailedPrecondition);
  // 1 MiB in 1 KiB chunks: far more than the stream window, so a download that is not read stays
  // in progress on the donor.
  StateSnapshot one_mib;
  one_mib.tensors.push_back(StateTensor{
      "t", "uint8", {1 << 20}, net::Payload::FromString(test::PatternString(1 << 20, 5))});
  ASSERT_TRUE(donor->Publish(one_mib, 4).ok());
  Status misaligned = ask(4, 1000).first;
  EXPECT_EQ(misaligned.code(), StatusCode::kInvalidArgument) << misaligned.ToString();
  Status beyond = ask(4, uint64_t{4} << 20).first;
  EXPECT_EQ(beyond.code(), StatusCode::kInvalidArgument) << beyond.ToString();
  Status unknown = ask(3, 0).first;
  EXPECT_EQ(unknown.code(), StatusCode::kNotFound) << unknown.ToString();
  EXPECT_NE(unknown.message().find("does not serve version 3"), std::string::npos)
      << unknown.ToString();

  auto [status, held] = ask(4, 0);
  ASSERT_TRUE(status.ok()) << status.ToString();
  ASSERT_TRUE(test::WaitUntil([&] { return donor->active_downloads() == 1; }, test::kPromptly));
  Status busy = ask(4, 0).first;
  EXPECT_EQ(busy.code(), StatusCode::kResourceExhausted) << busy.ToString();
  held->Cancel();
  ASSERT_TRUE(test::WaitUntil([&] { return donor->active_downloads() == 0; }, test::kPromptly));
  EXPECT_TRUE(ask(4, 0).first.ok());
}

TEST(StateTransferTest, PublishRefusesAManifestTooLargeForAMessageHeader) {
  auto donor_node = StartNode();
  ASSERT_NE(donor_node, nullptr);
  auto donor = StartDonor(*donor_node, 1024);
  ASSERT_NE(donor, nullptr);
  // 160 MiB in 1 KiB chunks: ~164k checksums, beyond the 4 MiB header. One shared buffer keeps
  // the test light.
  auto block = net::Payload::FromString(test::PatternString(size_t{1} << 20, 9));
  StateSnapshot huge;
  for (int i = 0; i < 160; ++i) huge.tensors.push_back(StateTensor{"t", "uint8", {1 << 20}, block});
  Status refused = donor->Publish(huge, 1);
  EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted) << refused.ToString();
  EXPECT_NE(refused.message().find("chunk_bytes"), std::string::npos) << refused.ToString();
  EXPECT_EQ(donor->version(), 0u);
}

TEST(StateTransferTest, ResumesFromAnotherDonorWhenTheDonorProcessIsKilled) {
  auto child = ChildProcess::Spawn({std::string(kRoleVariable) + "=donor"});
  ASSERT_NE(child, nullptr);
  auto line = child->ReadLine(milliseconds(20000));
  ASSERT_TRUE(line.has_value()) << "the donor process printed no address";
  auto child_address = net::PeerAddress::ParseList(*line);
  ASSERT_TRUE(child_address.ok()) << child_address.status().ToString();

  auto local_node = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(local_node, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto local = StartDonor(*local_node, kSmallChunk);
  ASSERT_NE(local, nullptr);
  StateSnapshot snapshot = MakeSnapshot(1);
  ASSERT_TRUE(local->Publish(snapshot, kSharedVersion).ok());

  StateDownloadOptions options = QuickOptions();
  const net::PeerId child_id = child_address->peer_id;
  bool killed = false;
  options.on_progress = [&](const StateDownloadProgress& progress) {
    if (killed || progress.donor != child_id || progress.verified_bytes < progress.total_bytes / 4)
      return;
    killed = true;
    child->Kill(SIGKILL);
  };
  auto result = DownloadState(*newcomer,
                              {StateDonorInfo::FromAddress(*child_address),
                               StateDonorInfo::FromAddress(local_node->visible_address())},
                              options);
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  EXPECT_TRUE(killed);
  ExpectSameState(snapshot, result->snapshot);
  ASSERT_EQ(result->attempts.size(), 2u);
  EXPECT_EQ(result->attempts[0].status.code(), StatusCode::kUnavailable)
      << result->attempts[0].status.ToString();
  EXPECT_GT(result->attempts[1].start_offset, 0u);
  EXPECT_LT(result->bytes_received - snapshot.TotalBytes(), snapshot.TotalBytes());
}

// ---------------------------------------------------------------------------------------------
// Finding donors.

TEST(StateDirectoryTest, OrdersNewestVersionFirstThenLeastLoaded) {
  auto make = [](uint64_t version, uint32_t load) {
    StateDonorInfo info;
    info.version = version;
    info.active_downloads = load;
    return info;
  };
  for (uint64_t seed = 0; seed < 20; ++seed) {
    std::vector<StateDonorInfo> donors = {make(1, 0), make(3, 2), make(2, 0), make(3, 0),
                                          make(3, 1)};
    OrderStateDonors(donors, seed);
    std::vector<std::pair<uint64_t, uint32_t>> order;
    for (const auto& donor : donors) order.emplace_back(donor.version, donor.active_downloads);
    EXPECT_EQ(order,
              (std::vector<std::pair<uint64_t, uint32_t>>{{3, 0}, {3, 1}, {3, 2}, {2, 0}, {1, 0}}));
  }
  // Equals are shuffled: over a few seeds both of two equal donors come first.
  std::set<std::string> firsts;
  for (uint64_t seed = 0; seed < 32; ++seed) {
    std::vector<StateDonorInfo> donors = {make(1, 0), make(1, 0)};
    donors[0].digest = "a";
    donors[1].digest = "b";
    OrderStateDonors(donors, seed);
    firsts.insert(donors[0].digest);
  }
  EXPECT_EQ(firsts.size(), 2u);
}

dht::DhtRunnerOptions LocalDhtOptions(std::vector<std::string> initial_peers = {}) {
  dht::DhtRunnerOptions options;
  options.initial_peers = std::move(initial_peers);
  options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};
  options.call_timeout = milliseconds(1000);
  return options;
}

TEST(StateDirectoryTest, NewcomerFindsTheNewestDonorThroughTheDht) {
  auto bootstrap = dht::DhtRunner::Start(LocalDhtOptions());
  ASSERT_TRUE(bootstrap.ok()) << bootstrap.status().ToString();
  auto first_dht = dht::DhtRunner::Start(LocalDhtOptions((*bootstrap)->visible_addresses()));
  auto second_dht = dht::DhtRunner::Start(LocalDhtOptions((*bootstrap)->visible_addresses()));
  ASSERT_TRUE(first_dht.ok()) << first_dht.status().ToString();
  ASSERT_TRUE(second_dht.ok()) << second_dht.status().ToString();

  // DhtRunner keeps its net::Node to itself, so each donor serves from a node of its own.
  auto old_node = StartNode();
  auto new_node = StartNode();
  auto newcomer = StartNode();
  ASSERT_NE(old_node, nullptr);
  ASSERT_NE(new_node, nullptr);
  ASSERT_NE(newcomer, nullptr);
  auto old_donor = StartDonor(*old_node);
  auto new_donor = StartDonor(*new_node);
  ASSERT_NE(old_donor, nullptr);
  ASSERT_NE(new_donor, nullptr);
  EXPECT_EQ(old_donor->Advertise(**first_dht, "run", std::chrono::seconds(30)).code(),
            StatusCode::kFailedPrecondition);
  StateSnapshot old_state = MakeSnapshot(61);
  StateSnapshot new_state = MakeSnapshot(62);
  old_state.tensors.resize(2);  // keep this test light
  new_state.tensors.resize(2);
  ASSERT_TRUE(old_donor->Publish(old_state, 10).ok());
  ASSERT_TRUE(new_donor->Publish(new_state, 11).ok());
  Status advertised = old_donor->Advertise(**first_dht, "run", std::chrono::seconds(30));
  ASSERT_TRUE(advertised.ok()) << advertised.ToString();
  advertised = new_donor->Advertise(**second_dht, "run", std::chrono::seconds(30));
  ASSERT_TRUE(advertised.ok()) << advertised.ToString();

  auto donors = FindStateDonors(**bootstrap, "run");
  ASSERT_TRUE(donors.ok()) << donors.status().ToString();
  ASSERT_EQ(donors->size(), 2u);
  EXPECT_EQ((*donors)[0].version, 11u);
  EXPECT_EQ((*donors)[0].address.peer_id, new_node->peer_id());
  EXPECT_EQ((*donors)[0].digest, new_donor->Info()->digest);
  EXPECT_EQ((*donors)[0].total_bytes, new_state.TotalBytes());
  EXPECT_EQ((*donors)[1].version, 10u);

  auto result = DownloadStateFromDht(*newcomer, **bootstrap, "run", QuickOptions());
  ASSERT_TRUE(result.ok()) << result.status().ToString();
  EXPECT_EQ(result->version, 11u);
  ExpectSameState(new_state, result->snapshot);

  auto nobody = DownloadStateFromDht(*newcomer, **bootstrap, "other_run", QuickOptions());
  ASSERT_FALSE(nobody.ok());
  EXPECT_EQ(nobody.status().code(), StatusCode::kNotFound) << nobody.status().ToString();
  EXPECT_NE(nobody.status().message().find("other_run.state"), std::string::npos);
}

}  // namespace
}  // namespace hivemind::averaging

int main(int argc, char** argv) {
  if (const char* role = std::getenv(hivemind::averaging::kRoleVariable)) {
    return hivemind::averaging::RunDonorProcess(role);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
