#pragma once

#include <atomic>
#include <list>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <zmq.hpp>

#include "common/worker_pool.h"
#include "net/command_queue.h"
#include "net/direct_hub.h"
#include "net/link.h"
#include "net/node.h"
#include "net/stream_impl.h"

namespace hivemind::net {

// Socket options shared by the ROUTER and every DEALER: linger, size cap, heartbeats.
void ApplyConnectionOptions(zmq::socket_t& socket, const NodeOptions& options);

// The Node: a reactor thread that owns every socket, a worker pool for handlers and completions,
// and one thread per served stream. Everything below "reactor state" is touched only by the
// reactor.
class NodeImpl : public Node, public StreamTransport {
 public:
  NodeImpl(NodeOptions options, Identity identity);
  ~NodeImpl() override;
  Status Open();  // binds sockets and starts the reactor

  const PeerId& peer_id() const override { return identity_.peer_id(); }
  const Identity& identity() const override { return identity_; }
  PeerAddress visible_address() const override { return visible_; }
  bool encrypted() const override { return options_.encryption; }
  void RegisterUnary(const std::string& method, UnaryHandler handler) override;
  void RegisterStream(const std::string& method, StreamHandler handler) override;
  Future<Message> Call(const PeerAddress& peer, const std::string& method, Message request,
                       CallOptions options) override;
  std::shared_ptr<Stream> OpenStream(const PeerAddress& peer, const std::string& method,
                                     CallOptions options) override;
  std::vector<PeerId> ConnectedPeers() const override;
  DirectConnectionStats direct_connections() const override;
  void Shutdown() override;

  // StreamTransport (reactor thread).
  void SendStreamData(StreamImpl& stream, Message message) override;
  void SendStreamClose(StreamImpl& stream, Status status) override;
  void SendStreamCredit(StreamImpl& stream, int messages) override;
  void AbortStream(StreamImpl& stream, Status status) override;

 private:
  using TimePoint = std::chrono::steady_clock::time_point;

  // The listener and dialer of direct streams, when options allow them (part of Open).
  Status StartDirectStreams();

  struct OutCall {
    uint64_t link_id;
    PeerId peer;
    std::string method;
    TimePoint deadline;
    Milliseconds timeout;
    Promise<Message> promise;
  };
  struct InCall {
    TimePoint deadline;
    std::shared_ptr<std::atomic<bool>> cancelled;
  };
  struct ServedStream {
    std::shared_ptr<StreamImpl> stream;
    TimePoint deadline;
    std::shared_ptr<std::atomic<bool>> cancelled;
    bool handler_done = false;
  };
  struct OutStream {
    std::shared_ptr<StreamImpl> stream;
    uint64_t link_id;
    TimePoint deadline;
    Milliseconds timeout;
    std::string method;
  };
  struct HandlerThread {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };

  using ServedStreams = std::map<std::pair<uint64_t, uint64_t>, ServedStream>;

  TimePoint DeadlineFor(const CallOptions& options) const;
  Milliseconds TimeoutFor(const CallOptions& options) const;

  // Reactor.
  void RunReactor();
  void PollOnce();
  void ReceiveFromRouter();
  void ReceiveFromLink(Link& link);
  void HandleZapRequest();
  // Handles one event; false when none was waiting.
  bool HandleMonitorEvent(zmq::socket_t& monitor, Link* link);
  void HandleFrames(Link& link, std::vector<zmq::message_t>& frames);
  void HandleHello(Link& link, const wire::Envelope& envelope);
  void HandleHelloAck(Link& link, const wire::Envelope& envelope);
  void HandleMessage(Link& link, wire::Envelope envelope, std::vector<zmq::message_t>& frames);
  void HandleContinuation(Link& link, const wire::Envelope& envelope,
                          std::vector<zmq::message_t>& frames);
  void RefuseMessage(Link& link, const wire::Envelope& envelope, const Status& status);
  void Dispatch(Link& link, const wire::Envelope& envelope, Message message);
  void DispatchRequest(Link& link, const wire::Envelope& envelope, Message message);
  void DispatchStreamOpen(Link& link, const wire::Envelope& envelope);
  void HandleCancel(Link& link, const wire::Envelope& envelope);
  void HandleStreamClose(Link& link, const wire::Envelope& envelope);
  void HandleCredit(Link& link, const wire::Envelope& envelope);

  Link* FindLink(uint64_t link_id);
  // A live link to `peer`, or a new outbound one when `peer` has endpoints (or we know some).
  Result<Link*> LinkFor(const PeerAddress& peer);
  Result<Link*> Dial(const PeerId& peer, std::vector<Endpoint> endpoints);
  Status ConnectToCurrentEndpoint(Link& link);
  void FailLink(Link& link, const Status& status);
  void SetPeerLink(const PeerId& peer, uint64_t link_id);

  void SendControl(Link& link, const wire::Envelope& envelope);
  void Enqueue(Link& link, wire::Envelope envelope, std::vector<Payload> payloads);
  void Flush(Link& link);
  // Sends one ZeroMQ message on `link`; false on EAGAIN (kept staged) or a dead link.
  bool SendFrames(Link& link, std::vector<zmq::message_t>& frames);
  void ReturnCredit(Link& link);

  void StartCall(uint64_t call_id, PeerAddress peer, std::string method, Message request,
                 TimePoint deadline, Milliseconds timeout, Promise<Message> promise);
  void StartStream(std::shared_ptr<StreamImpl> stream, PeerAddress peer, std::string method,
                   TimePoint deadline, Milliseconds timeout);
  void Respond(uint64_t link_id, uint64_t call_id, Result<Message> result);
  void FinishServedStream(uint64_t link_id, uint64_t call_id);
  void EraseServedStream(ServedStreams::iterator it);
  Link* LinkOfStream(StreamImpl& stream);
  void CompleteOutCall(uint64_t call_id, Result<Message> result);
  void SweepTimers();
  void ReapHandlerThreads(bool all);
  void UpdateConnectedPeers();

  const NodeOptions options_;
  const MessageLimits limits_;
  const Identity identity_;
  PeerAddress visible_;
  std::shared_ptr<CommandQueue> commands_ = std::make_shared<CommandQueue>();
  std::shared_ptr<WorkerPool> pool_;
  std::atomic<uint64_t> next_call_id_{1};
  std::atomic<bool> shut_down_{false};
  std::mutex shutdown_mutex_;
  std::thread reactor_thread_;

  // Direct streams (CallOptions::direct): only without encryption.
  std::unique_ptr<DirectHub> direct_;

  mutable std::mutex handlers_mutex_;
  std::unordered_map<std::string, UnaryHandler> unary_handlers_;
  std::unordered_map<std::string, StreamHandler> stream_handlers_;

  mutable std::mutex peers_mutex_;
  std::vector<PeerId> connected_peers_;

  // Reactor state.
  zmq::context_t context_;
  std::unique_ptr<zmq::socket_t> router_;
  std::unique_ptr<zmq::socket_t> router_monitor_;
  std::unique_ptr<zmq::socket_t> zap_;
  bool stopping_ = false;
  uint64_t next_link_id_ = 1;
  std::map<uint64_t, std::unique_ptr<Link>> links_;
  std::unordered_map<std::string, uint64_t> link_by_routing_id_;
  std::unordered_map<PeerId, uint64_t> link_by_peer_;
  // Descriptor -> DISCONNECTED events still to come for inbound links already closed because a
  // new connection reused their descriptor (see ReceiveFromRouter).
  std::unordered_map<int, int> stale_disconnects_;
  std::unordered_map<PeerId, std::vector<Endpoint>> address_book_;
  std::unordered_map<uint64_t, OutCall> out_calls_;
  std::unordered_map<uint64_t, OutStream> out_streams_;
  std::map<std::pair<uint64_t, uint64_t>, InCall> in_calls_;
  ServedStreams served_streams_;
  std::list<HandlerThread> handler_threads_;
  TimePoint next_sweep_;
};

}  // namespace hivemind::net
