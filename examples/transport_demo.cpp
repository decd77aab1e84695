// A tour of the transport: four peers in this process, on 127.0.0.1, each with its own key pair.
// alice, bob and carol listen; dave runs in client mode (as a peer behind a NAT would).
// The demo shows
//   1. authenticated unary calls (the server learns the caller's peer id from its key),
//   2. a bidirectional stream (alice streams a 32 MiB tensor in 8 chunks, carol sums as it goes),
//   3. the client-mode peer being called back over its own outbound connection,
//   4. a call to an address with the wrong peer id being refused by the handshake,
//   5. a peer shutting down while a call to it is pending: the call fails, it does not hang.
// Every wait is bounded. Exits 0 when everything behaved as expected, 1 otherwise.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/future.h"
#include "common/status.h"
#include "net/address.h"
#include "net/identity.h"
#include "net/node.h"
#include "net/peer_id.h"

namespace {

namespace hm = hivemind;
namespace net = hivemind::net;
using Clock = std::chrono::steady_clock;
using hm::Result;
using hm::Status;
using hm::StatusCode;

// Loopback calls take milliseconds; these limits only matter if something is broken, and keep the
// demo from hanging then.
constexpr std::chrono::milliseconds kCallTimeout{5000};
constexpr std::chrono::milliseconds kWaitLimit{8000};

constexpr char kHelloMethod[] = "demo.hello";
constexpr char kSumMethod[] = "demo.sum";
constexpr char kSlowMethod[] = "demo.slow";

constexpr int kTensorChunks = 8;
constexpr size_t kChunkBytes = size_t{4} << 20;
constexpr size_t kChunkFloats = kChunkBytes / sizeof(float);

// Handlers print from the nodes' worker threads; one lock keeps lines whole.
std::mutex print_mutex;

void Say(const std::string& line) {
  std::lock_guard<std::mutex> lock(print_mutex);
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

template <class T>
Result<T> Await(const hm::Future<T>& future, const std::string& what) {
  auto result = future.WaitFor(kWaitLimit);
  if (!result) {
    return Status(StatusCode::kDeadlineExceeded,
                  what + ": no result within " + std::to_string(kWaitLimit.count()) + " ms");
  }
  return std::move(*result);
}

Status Unexpected(const std::string& what) { return Status(StatusCode::kInternal, what); }

net::CallOptions DemoCallOptions() {
  net::CallOptions options;
  options.timeout = kCallTimeout;
  return options;
}

// The value of element `index` of the demo tensor: small multiples of 1/4, so float holds them
// exactly and sums in double are exact, and sender and receiver must agree to the last bit.
float TensorValue(size_t index) { return static_cast<float>(index % 1000) * 0.25f; }

// carol's stream handler: sums each chunk of the tensor as it arrives and answers with the
// running sum, until the caller closes its side.
Status SumTensorChunks(const net::CallContext& context, net::Stream& stream) {
  double sum = 0;
  for (;;) {
    auto next = stream.Read().WaitFor(context.deadline - Clock::now());
    if (!next) return Status(StatusCode::kDeadlineExceeded, "carol: no chunk in time");
    if (!next->ok()) return next->status();
    if (!next->value()) return Status::Ok();  // alice closed her side: the stream is done
    const net::Message& chunk = *next->value();
    if (chunk.payloads.size() != 1 || chunk.payloads[0].size() % sizeof(float) != 0) {
      return Status(StatusCode::kInvalidArgument, "carol: a chunk must be one float array");
    }
    // Received payloads are only guaranteed 8-byte alignment; copy out instead of casting.
    std::vector<float> values(chunk.payloads[0].size() / sizeof(float));
    std::memcpy(values.data(), chunk.payloads[0].data(), chunk.payloads[0].size());
    for (float value : values) sum += value;
    // %.17g round-trips a double exactly, so alice can compare bit for bit.
    char text[32];
    std::snprintf(text, sizeof(text), "%.17g", sum);
    auto written = stream.Write(net::Message(text)).WaitFor(context.deadline - Clock::now());
    if (!written) return Status(StatusCode::kDeadlineExceeded, "carol: reply not sent in time");
    if (!written->ok()) return written->status();
  }
}

class Demo {
 public:
  Status StartPeers();
  Status UnaryCalls();
  Status BidirectionalStream();
  Status ClientModeCallback();
  Status WrongPeerIdRefused();
  Status PeerDiesMidCall();
  void ShutdownAll();

 private:
  struct Peer {
    std::string name;
    std::unique_ptr<net::Node> node;
  };

  Peer& alice() { return peers_[0]; }
  Peer& bob() { return peers_[1]; }
  Peer& carol() { return peers_[2]; }
  Peer& dave() { return peers_[3]; }
  std::string NameOf(const net::PeerId& id) const;
  void RegisterHandlers(Peer& peer);
  Status Hello(Peer& caller, Peer& callee, const net::PeerAddress& address);

  std::vector<Peer> peers_;
  // Written once before any handler is registered; read-only afterwards, so handlers on worker
  // threads may read it without a lock.
  std::map<net::PeerId, std::string> names_;
};

std::string Demo::NameOf(const net::PeerId& id) const {
  auto it = names_.find(id);
  return it == names_.end() ? "an unknown peer" : it->second;
}

Status Demo::StartPeers() {
  Say("Starting 4 peers on 127.0.0.1, each with its own key pair.");
  for (const char* name : {"alice", "bob", "carol", "dave"}) {
    net::NodeOptions options;
    options.identity = net::Identity::Generate();
    options.listen_addresses = {"/ip4/127.0.0.1/tcp/0"};  // port 0: the system picks a free one
    options.client_mode = std::string(name) == "dave";
    options.default_call_timeout = kCallTimeout;
    options.connect_timeout = kCallTimeout;
    auto node = net::Node::Start(options);
    if (!node.ok()) return node.status().WithContext(std::string("starting ") + name);
    peers_.push_back(Peer{name, std::move(*node)});
  }
  for (const auto& peer : peers_) names_[peer.node->peer_id()] = peer.name;
  for (auto& peer : peers_) RegisterHandlers(peer);

  Say("");
  for (const auto& peer : peers_) {
    std::string padded = peer.name + std::string(6 - std::min<size_t>(peer.name.size(), 5), ' ');
    Say("  " + padded + "id      " + peer.node->peer_id().ToString());
    if (peer.node->visible_address().endpoints.empty()) {
      Say("        address (none: client mode, it only dials out)");
    } else {
      for (const auto& text : peer.node->visible_address().ToStrings()) {
        Say("        address " + text);
      }
    }
  }
  Say("  (another machine would pass such an address as HIVEMIND_INITIAL_PEERS)");
  return Status::Ok();
}

void Demo::RegisterHandlers(Peer& peer) {
  const std::string name = peer.name;
  // Answers with the caller's peer id as this node authenticated it, so the caller can check it.
  peer.node->RegisterUnary(kHelloMethod, [this, name](const net::CallContext& context, net::Message,
                                                      net::Responder respond) {
    Say("    [" + name + "] " + kHelloMethod + " from " + NameOf(context.peer) + " (" +
        context.peer.ShortString() + "), proven by its key");
    respond(net::Message(context.peer.ToString()));
  });

  if (name == "carol") peer.node->RegisterStream(kSumMethod, SumTensorChunks);
}

Status Demo::Hello(Peer& caller, Peer& callee, const net::PeerAddress& address) {
  Say("  " + caller.name + " -> " + callee.name + ": " + kHelloMethod);
  auto reply =
      Await(caller.node->Call(address, kHelloMethod, net::Message("hi"), DemoCallOptions()),
            caller.name + " calling " + callee.name);
  if (!reply.ok()) return reply.status();
  if (reply->header != caller.node->peer_id().ToString()) {
    return Unexpected(callee.name + " saw the caller as " + reply->header + ", not as " +
                      caller.name);
  }
  Say("  " + caller.name + " <- " + callee.name + ": you are " + caller.name + " (" +
      caller.node->peer_id().ShortString() + ")");
  return Status::Ok();
}

Status Demo::UnaryCalls() {
  Say("\n[1] Authenticated unary calls");
  // Exactly what a user does with an address string: parse it, then call.
  for (auto [caller, callee] :
       {std::pair{&alice(), &bob()}, std::pair{&bob(), &carol()}, std::pair{&carol(), &alice()}}) {
    auto address = net::PeerAddress::Parse(callee->node->visible_address().ToStrings().front());
    if (!address.ok())
      return address.status().WithContext("parsing " + callee->name + "'s address");
    Status status = Hello(*caller, *callee, *address);
    if (!status.ok()) return status;
  }
  return Status::Ok();
}

Status Demo::BidirectionalStream() {
  Say("\n[2] Bidirectional stream: alice streams a " +
      std::to_string(kTensorChunks * kChunkBytes >> 20) + " MiB tensor to carol in " +
      std::to_string(kTensorChunks) + " chunks of " + std::to_string(kChunkBytes >> 20) + " MiB");
  auto start = Clock::now();
  auto stream =
      alice().node->OpenStream(carol().node->visible_address(), kSumMethod, DemoCallOptions());
  double expected = 0;
  for (int chunk = 0; chunk < kTensorChunks; ++chunk) {
    // A fresh buffer per chunk: the transport reads it after Write returns, so it must not change.
    net::Payload payload = net::Payload::Allocate(kChunkBytes);
    std::vector<float> values(kChunkFloats);
    for (size_t i = 0; i < kChunkFloats; ++i) {
      values[i] = TensorValue(static_cast<size_t>(chunk) * kChunkFloats + i);
      expected += values[i];
    }
    std::memcpy(payload.mutable_data(), values.data(), kChunkBytes);

    auto written = Await(stream->Write(net::Message("chunk", {payload})), "alice writing a chunk");
    if (!written.ok()) return written.status();
    auto reply = Await(stream->Read(), "alice reading carol's running sum");
    if (!reply.ok()) return reply.status();
    if (!reply->has_value()) return Unexpected("carol ended the stream early");
    if (std::stod((*reply)->header) != expected) {
      return Unexpected("carol's running sum " + (*reply)->header + " differs from alice's " +
                        std::to_string(expected));
    }
    char line[96];
    std::snprintf(line, sizeof(line), "  chunk %d/%d sent; carol's running sum: %.2f", chunk + 1,
                  kTensorChunks, std::stod((*reply)->header));
    Say(line);
  }
  stream->CloseWrite();
  auto end = Await(stream->Read(), "alice waiting for the end of the stream");
  if (!end.ok()) return end.status();
  if (end->has_value()) return Unexpected("carol sent more than one reply per chunk");
  double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  char line[128];
  std::snprintf(line, sizeof(line), "  sums match (%.2f); stream closed cleanly after %.0f ms",
                expected, ms);
  Say(line);
  return Status::Ok();
}

Status Demo::ClientModeCallback() {
  Say("\n[3] Client mode: dave has no address; he dials alice, and she calls him back");
  Status status = Hello(dave(), alice(), alice().node->visible_address());
  if (!status.ok()) return status;

  // No endpoints: the call must use the connection dave opened.
  net::PeerAddress dave_by_id;
  dave_by_id.peer_id = dave().node->peer_id();
  Say("  (alice knows only dave's peer id; the call goes over dave's outbound connection)");
  status = Hello(alice(), dave(), dave_by_id);
  if (!status.ok()) return status;

  // bob never talked to dave, so he has no way to reach him: a clear error, not a hang.
  Say("  bob -> dave: " + std::string(kHelloMethod) + " (bob has no connection to dave)");
  auto reply =
      Await(bob().node->Call(dave_by_id, kHelloMethod, net::Message("hi"), DemoCallOptions()),
            "bob calling dave");
  if (reply.ok()) return Unexpected("bob reached dave without any connection to him");
  if (reply.status().code() != StatusCode::kUnavailable) return reply.status();
  Say("  refused as expected:");
  Say("    " + reply.status().ToString());
  return Status::Ok();
}

Status Demo::WrongPeerIdRefused() {
  Say("\n[4] Wrong peer id: carol dials bob's endpoint, expecting a key bob does not hold");
  // With CURVE the caller encrypts to the key that the peer id names; only its holder can
  // complete the handshake, so whoever listens at an address cannot pose as another peer.
  // (The id must be one carol has no connection to: a live connection would be reused.)
  net::PeerAddress forged = bob().node->visible_address();
  forged.peer_id = net::Identity::Generate().peer_id();
  Say("  carol -> " + forged.ToString());
  auto reply =
      Await(carol().node->Call(forged, kHelloMethod, net::Message("hi"), DemoCallOptions()),
            "carol calling a forged address");
  if (reply.ok()) return Unexpected("the call to a forged address succeeded");
  if (reply.status().code() == StatusCode::kDeadlineExceeded) {
    return reply.status().WithContext("refused only by the deadline, not by the handshake");
  }
  Say("  refused:");
  Say("    " + reply.status().ToString());
  return Status::Ok();
}

Status Demo::PeerDiesMidCall() {
  Say("\n[5] A peer dies mid-call: bob shuts down while carol waits on him");
  // bob's handler takes the call and keeps it unanswered, like a long computation.
  hm::Promise<net::Responder> taken;
  bob().node->RegisterUnary(kSlowMethod,
                            [taken](const net::CallContext&, net::Message, net::Responder respond) {
                              taken.Set(std::move(respond));
                            });
  Say("  carol -> bob: " + std::string(kSlowMethod));
  auto call = carol().node->Call(bob().node->visible_address(), kSlowMethod, net::Message("work"),
                                 DemoCallOptions());
  auto responder = Await(taken.future(), "bob receiving carol's call");
  if (!responder.ok()) return responder.status();
  Say("    [bob] working on it... and shutting down");

  auto shutdown_start = Clock::now();
  bob().node->Shutdown();
  auto result = Await(call, "carol waiting for bob");
  double ms = std::chrono::duration<double, std::milli>(Clock::now() - shutdown_start).count();
  // The handler must still answer once; after shutdown the answer goes nowhere, harmlessly.
  (*responder)(Status(StatusCode::kCancelled, "bob shut down"));

  if (result.ok()) return Unexpected("carol's call succeeded although bob never answered");
  StatusCode code = result.status().code();
  if (code != StatusCode::kUnavailable && code != StatusCode::kCancelled) {
    return result.status().WithContext("carol's call failed with an unexpected code");
  }
  char line[64];
  std::snprintf(line, sizeof(line), "  carol's call failed %.1f ms after bob left:", ms);
  Say(line);
  Say("    " + result.status().ToString());

  // The survivors carry on.
  return Hello(carol(), alice(), alice().node->visible_address());
}

void Demo::ShutdownAll() {
  // Reverse order: the client-mode peer first, so nobody waits on it.
  for (auto it = peers_.rbegin(); it != peers_.rend(); ++it) it->node->Shutdown();
}

}  // namespace

int main() {
  Say("hivemind transport demo");
  auto start = Clock::now();
  Demo demo;
  using Step = Status (Demo::*)();
  Status status;
  for (Step step : {&Demo::StartPeers, &Demo::UnaryCalls, &Demo::BidirectionalStream,
                    &Demo::ClientModeCallback, &Demo::WrongPeerIdRefused, &Demo::PeerDiesMidCall}) {
    status = (demo.*step)();
    if (!status.ok()) break;  // later steps build on earlier ones
  }
  demo.ShutdownAll();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  char line[96];
  if (!status.ok()) {
    std::snprintf(line, sizeof(line), "\nDEMO FAILED after %.1f s:", seconds);
    Say(line);
    Say("  " + status.ToString());
    return 1;
  }
  std::snprintf(line, sizeof(line), "\nAll steps behaved as expected (%.1f s).", seconds);
  Say(line);
  return 0;
}
