#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/future.h"
#include "common/status.h"
#include "net/address.h"
#include "net/identity.h"
#include "net/message.h"
#include "net/peer_id.h"

namespace hivemind::net {

using Milliseconds = std::chrono::milliseconds;

struct NodeOptions {
  // Key pair; a fresh ephemeral one when unset. Use Identity::LoadOrCreate for a persistent id.
  std::optional<Identity> identity;
  // Multiaddrs to listen on; port 0 picks a free port. Ignored in client mode.
  std::vector<std::string> listen_addresses = {"/ip4/0.0.0.0/tcp/0"};
  // Multiaddrs to tell others instead of the listen addresses (NAT, port forwarding). Without
  // /p2p/.
  std::vector<std::string> announce_addresses;
  // A client-mode node accepts no inbound connections; it calls others, and gets replies and
  // streams back (and can be called back) over its own outbound connections.
  bool client_mode = false;
  // CURVE encryption + authentication of every link. Turn off only inside a trusted cluster: peer
  // ids are then taken on trust. Both sides of a link must agree.
  bool encryption = true;

  Milliseconds default_call_timeout{30000};
  // A connection with no traffic (not even heartbeats) for this long is closed and its calls fail.
  Milliseconds heartbeat_interval{1000};
  Milliseconds heartbeat_timeout{5000};
  // How long to keep trying to connect before the calls waiting for that connection fail.
  Milliseconds connect_timeout{5000};

  // Largest logical message (header + payloads) accepted or sent.
  size_t max_message_bytes = size_t{1} << 30;
  // Largest serialized header of one message.
  size_t max_header_bytes = size_t{4} << 20;
  // Payloads are cut into chunks of this size; at most `link_window_chunks` chunks per connection
  // are in flight, so memory per connection stays bounded whatever the sender does.
  size_t chunk_bytes = size_t{4} << 20;
  int link_window_chunks = 8;
  // How many unread messages a stream buffers before its writer has to wait.
  int stream_window_messages = 16;
  // Per remote peer: inbound streams open at once, unary requests in progress at once.
  int max_inbound_streams_per_peer = 64;
  int max_inflight_requests_per_peer = 1024;
  // Threads running unary handlers and completion callbacks.
  int worker_threads = 2;
  // Serve and open direct streams (CallOptions::direct): bulk streams on a TCP connection of
  // their own, beside the ZeroMQ link (docs/transport.md). With encryption their bytes travel in
  // AEAD records keyed through the encrypted link (AES-256-GCM or ChaCha20-Poly1305).
  bool direct_streams = true;
  // A direct connection whose stream ended cleanly both ways is kept this long for the next
  // direct stream to the same peer, which then costs one round trip instead of a request, a new
  // connection and a handshake. The serving side keeps its end twice as long plus 1 s, so a
  // caller does not pick a connection its peer is closing. Zero: one connection per stream.
  Milliseconds direct_idle_timeout{20000};
};

// A node's direct connections so far (Node::direct_connections): for monitoring and tests.
struct DirectConnectionStats {
  uint64_t dialed = 0;     // connections this node dialed and set up for a stream
  uint64_t reused = 0;     // streams this node opened on a kept connection instead
  size_t idle = 0;         // connections kept now for this node's next streams
  size_t served_idle = 0;  // connections of callers kept now, waiting for their next stream
};

struct CallOptions {
  // Zero = NodeOptions::default_call_timeout.
  Milliseconds timeout{0};
  // OpenStream only: run the stream on a TCP connection of its own, written and read by the
  // stream's own threads, when both nodes allow it; otherwise, or when that connection cannot be
  // set up, as an ordinary stream over the link. Same semantics either way; for streams of large
  // messages, where ZeroMQ's extra thread hops and allocations cost more than one more connection.
  bool direct = false;
};

// What a handler knows about the call it serves.
struct CallContext {
  PeerId peer;  // authenticated when encryption is on
  std::string method;
  std::chrono::steady_clock::time_point deadline;
  std::shared_ptr<const std::atomic<bool>> cancelled;  // set when the caller cancels or goes away

  bool IsCancelled() const { return cancelled && cancelled->load(); }
};

// Lets the reader of a stream choose where received payloads land, so that values can arrive where
// they are used instead of being copied there from a transport buffer (direct streams honour it;
// other streams ignore it). `place` runs on the stream's reader thread before each payload is
// read, given the message's header, the payload's index and its size, and returns a buffer of
// exactly that size, or an empty Payload for a buffer of the transport's own. `arrived` (if set)
// is told about the bytes of such a buffer as they land, in order, while they are still in the
// reader's cache, in runs that start and end at multiples of 64 bytes from the buffer's start
// (except at its end). `placed` runs for every buffer `place` returned, once the read into it
// ended: `complete` is false when the read failed (or the size was wrong) and the buffer holds a
// partial write. All three run on the reader thread, one buffer at a time.
struct ReceivePlacer {
  std::function<Payload(const std::string& header, size_t index, size_t size)> place;
  std::function<void(const uint8_t* data, size_t size)> arrived;
  std::function<void(const Payload& buffer, bool complete)> placed;
};

// A bidirectional stream of messages. Thread-safe. Writes are flow-controlled: a write's future
// completes once the message is handed to the connection; it waits while the reader's window is
// full.
class Stream {
 public:
  virtual ~Stream() = default;
  virtual const PeerId& peer() const = 0;
  virtual Future<Empty> Write(Message message) = 0;
  // No more writes from this side. For a server handler, returning from the handler does this too.
  virtual void CloseWrite() = 0;
  // The next message, or nullopt once the other side closed its writes with OK. Fails with the
  // other side's error status, kUnavailable if the peer died, kDeadlineExceeded at the deadline.
  virtual Future<std::optional<Message>> Read() = 0;
  // Aborts both directions; the other side sees kCancelled (kUnavailable for a direct stream
  // cancelled in the middle of a message).
  virtual void Cancel() = 0;
  // Whether this stream runs on a direct connection (CallOptions::direct). For an opened stream,
  // false until that connection is set up; it is once a first read or write has completed.
  virtual bool direct() const { return false; }
  // Used for the messages read from now on (see ReceivePlacer); false if this stream ignores it.
  virtual bool SetReceivePlacer(std::shared_ptr<const ReceivePlacer> placer) {
    (void)placer;
    return false;
  }
};

// Calls the handler must answer exactly once, from any thread, possibly after returning. Answers
// after the caller gave up, or after this node shut down, are dropped.
using Responder = std::function<void(Result<Message>)>;
using UnaryHandler = std::function<void(const CallContext&, Message request, Responder respond)>;
// Runs on a thread of its own. The returned status ends the stream for the caller.
using StreamHandler = std::function<Status(const CallContext&, Stream& stream)>;

// A peer on the network: listens (unless client mode), connects to others on demand, serves
// registered methods and makes calls. All methods are thread-safe.
class Node {
 public:
  static Result<std::unique_ptr<Node>> Start(NodeOptions options);
  virtual ~Node() = default;

  virtual const PeerId& peer_id() const = 0;
  virtual const Identity& identity() const = 0;
  // Where others can reach this node (announce addresses if set, else the bound listen addresses);
  // each ends in /p2p/<peer id>. Empty in client mode.
  virtual PeerAddress visible_address() const = 0;
  // Whether its links and direct streams are encrypted (NodeOptions::encryption).
  virtual bool encrypted() const = 0;

  // Methods can be registered at any time; registering a name twice replaces the handler.
  virtual void RegisterUnary(const std::string& method, UnaryHandler handler) = 0;
  virtual void RegisterStream(const std::string& method, StreamHandler handler) = 0;

  // Sends `request` to `peer` and completes with the reply or an error. The future's Cancel()
  // cancels the call on both sides. A live connection to `peer.peer_id` is reused whatever the
  // endpoints say (it is already authenticated); otherwise the endpoints are dialed in order, or,
  // when there are none, addresses this peer announced earlier.
  virtual Future<Message> Call(const PeerAddress& peer, const std::string& method, Message request,
                               CallOptions options = {}) = 0;
  virtual std::shared_ptr<Stream> OpenStream(const PeerAddress& peer, const std::string& method,
                                             CallOptions options = {}) = 0;

  // Peers with a live connection right now.
  virtual std::vector<PeerId> ConnectedPeers() const = 0;
  virtual DirectConnectionStats direct_connections() const { return {}; }

  // Fails pending calls with kCancelled, closes connections and joins threads. Idempotent.
  virtual void Shutdown() = 0;
};

}  // namespace hivemind::net
