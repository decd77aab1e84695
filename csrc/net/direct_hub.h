// The direct streams of one node (CallOptions::direct, docs/transport.md): the listener that
// serves them, the single-use offers that admit a caller to it, the dialing of outbound ones, and
// the threads and streams to stop at shutdown. Between nodes with encryption every byte after the
// hello is sealed with a key sent in the offer (direct_cipher.h).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/thread_set.h"
#include "net/direct_stream.h"
#include "net/node.h"

namespace hivemind::net {

// The unary method that asks a node for a direct connection (reply header: wire::DirectOffer).
constexpr char kDirectOfferMethod[] = "net.v1.direct";

class DirectHub {
 public:
  // What the hub needs of its node.
  struct Hooks {
    std::function<StreamHandler(const std::string& method)> handler_for;
    std::function<Future<Message>(const PeerAddress&, const std::string&, Message, CallOptions)>
        call;
    // An ordinary stream: the fallback when a direct one cannot be set up.
    std::function<std::shared_ptr<Stream>(const PeerAddress&, const std::string&, CallOptions)>
        open_ordinary;
  };

  // Listens on `listen_host` (an IPv4 address; empty: serves nothing, only dials) at a port the
  // system picks.
  static Result<std::unique_ptr<DirectHub>> Start(const NodeOptions& options,
                                                  const std::string& listen_host, Hooks hooks);
  ~DirectHub();

  // The answer to kDirectOfferMethod (`request`: a wire::DirectAsk) from `caller`: a port and a
  // token only `caller` may use, once, within a few seconds; with encryption, the stream's key.
  Result<Message> Offer(const PeerId& caller, const Message& request);
  // A stream that dials in the background and falls back to an ordinary one when it must.
  std::shared_ptr<Stream> Open(const PeerAddress& peer, const std::string& method,
                               Milliseconds timeout);
  // Fails every direct stream, stops serving, closes kept connections, joins every thread.
  // Idempotent.
  void Stop();
  DirectConnectionStats stats() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    PeerId peer;
    Clock::time_point expiry;
    std::string key;  // with encryption
    wire::DirectCipherKind cipher = wire::DIRECT_PLAIN;
  };

  // A connection kept after its stream ended cleanly (caller side).
  struct IdleConnection {
    int fd = -1;
    std::shared_ptr<DirectCipher> cipher;
    Clock::time_point since;
  };

  DirectHub(const NodeOptions& options, Hooks hooks);
  void RunAcceptor();
  // One accepted connection: its hello with the offer's token, then its first stream.
  void Serve(int fd);
  // Callee: a connection whose stream ended cleanly waits for its caller's next hello.
  void ServeIdle(int fd, PeerId peer, std::shared_ptr<DirectCipher> cipher);
  // Callee: the stream `hello` asks for on `fd`, from `peer`: the ack, then the method's
  // handler, on this thread.
  void ServeStream(int fd, const PeerId& peer, std::shared_ptr<DirectCipher> cipher,
                   const wire::DirectFrame& hello);
  void Dial(const std::shared_ptr<DirectStream>& stream, const PeerAddress& peer,
            const std::string& method, Milliseconds timeout);
  DirectStream::Settings SettingsFor(const PeerId& peer, Milliseconds timeout, bool we_called);
  // Caller: keeps the connection of a stream to `peer` that ended cleanly (or closes it when
  // there is no room). An idle connection to `peer` that still looks alive, if any.
  void KeepIdle(const PeerId& peer, int fd, std::shared_ptr<DirectCipher> cipher);
  std::optional<IdleConnection> TakeIdle(const PeerId& peer);
  // Remembers `stream` for Stop; false once stopped.
  bool Track(const std::shared_ptr<DirectStream>& stream);
  bool DirectRefused(const PeerId& peer);
  void RefuseDirect(const PeerId& peer);

  const NodeOptions options_;
  const Hooks hooks_;
  const std::shared_ptr<ThreadSet> threads_ = std::make_shared<ThreadSet>();
  const std::shared_ptr<PayloadRecycler> buffers_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // an eventfd that ends the acceptor's poll
  uint16_t port_ = 0;
  std::thread acceptor_;

  mutable std::mutex mutex_;
  bool stopped_ = false;
  std::map<std::string, Pending> offers_;                          // by token
  std::set<int> handshakes_;                                       // accepted, hello not read yet
  std::vector<std::weak_ptr<DirectStream>> streams_;               // for Stop
  std::unordered_map<PeerId, int> served_per_peer_;                // handlers running
  std::unordered_map<PeerId, Clock::time_point> no_direct_until_;  // dialing failed recently
  std::unordered_map<PeerId, std::vector<IdleConnection>> idle_;   // kept, newest last
  size_t idle_count_ = 0;
  size_t served_idle_ = 0;  // callee side: connections waiting for their caller's next stream
  uint64_t dialed_ = 0;
  uint64_t reused_ = 0;
};

}  // namespace hivemind::net
