// The reactor half of NodeImpl: everything here runs on the reactor thread, which alone owns the
// sockets, links and call tables (see node_impl.h).
#include <sodium.h>

#include <algorithm>
#include <cstring>

#include "common/logging.h"
#include "net/node_impl.h"

namespace hivemind::net {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kSweepInterval = std::chrono::milliseconds(20);
constexpr int kMaxMessagesPerPoll = 256;
constexpr size_t kMaxAddressesPerPeer = 8;
constexpr int kMaxHandshakeDisconnects = 3;

std::string Hex(const void* data, size_t size) {
  std::string text(size * 2 + 1, '\0');
  sodium_bin2hex(text.data(), text.size(), static_cast<const unsigned char*>(data), size);
  text.resize(size * 2);
  return text;
}

std::vector<zmq::message_t> ReceiveMultipart(zmq::socket_t& socket) {
  std::vector<zmq::message_t> frames;
  for (;;) {
    zmq::message_t frame;
    auto received = socket.recv(frame, zmq::recv_flags::dontwait);
    if (!received) return frames;
    bool more = frame.more();
    frames.push_back(std::move(frame));
    if (!more) return frames;
  }
}

long long MillisecondsBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(to - from).count();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The loop.

void NodeImpl::RunReactor() {
  while (!stopping_) PollOnce();

  Status closed(StatusCode::kCancelled, "the node is shut down");
  for (auto& [id, call] : out_calls_) {
    pool_->Post([promise = call.promise, closed] { promise.Set(closed); });
  }
  out_calls_.clear();
  for (auto& [id, entry] : out_streams_) entry.stream->Fail(closed);
  out_streams_.clear();
  for (auto& [key, entry] : served_streams_) {
    entry.cancelled->store(true);
    entry.stream->Fail(closed);
  }
  served_streams_.clear();
  for (auto& [key, call] : in_calls_) call.cancelled->store(true);
  in_calls_.clear();
  links_.clear();
  // As for links (Link::CloseSocket): no monitor event may find its reader closed.
  if (router_) zmq_socket_monitor(router_->handle(), nullptr, 0);
  router_monitor_.reset();
  router_.reset();
  zap_.reset();
  // Commands that arrived meanwhile see stopping_ and fail their promises.
  for (auto& command : commands_->Close()) command();
  UpdateConnectedPeers();
}

void NodeImpl::PollOnce() {
  std::vector<zmq_pollitem_t> items;
  std::vector<uint64_t> item_links;  // link id per item; 0 for the node's own sockets
  auto add = [&](void* socket, int fd, short events, uint64_t link_id) {
    items.push_back(zmq_pollitem_t{socket, fd, events, 0});
    item_links.push_back(link_id);
  };
  add(nullptr, commands_->fd(), ZMQ_POLLIN, 0);
  if (zap_) add(zap_->handle(), 0, ZMQ_POLLIN, 0);
  if (router_) {
    // Disconnections first: a closed connection's file descriptor may already be reused by a new
    // one whose messages wait on the ROUTER, and links are matched to these events by descriptor.
    add(router_monitor_->handle(), 0, ZMQ_POLLIN, 0);
    add(router_->handle(), 0, ZMQ_POLLIN, 0);
  }
  bool router_blocked = false;
  for (auto& [id, link] : links_) {
    if (link->state == Link::State::kDead) continue;
    if (link->outbound) {
      add(link->socket->handle(), 0, ZMQ_POLLIN | (link->blocked ? ZMQ_POLLOUT : 0), id);
      add(link->monitor->handle(), 0, ZMQ_POLLIN, id);
    } else if (link->blocked) {
      router_blocked = true;  // the ROUTER has no per-peer POLLOUT: retry soon
    }
  }
  auto now = Clock::now();
  long timeout = std::max<long long>(0, MillisecondsBetween(now, next_sweep_));
  if (router_blocked) timeout = std::min<long>(timeout, 1);
  if (zmq_poll(items.data(), static_cast<int>(items.size()), timeout) < 0 && zmq_errno() != EINTR) {
    HM_LOG(kError) << "zmq_poll failed: " << zmq_strerror(zmq_errno());
  }

  for (size_t i = 0; i < items.size(); ++i) {
    if (items[i].revents == 0) continue;
    if (i == 0) {
      for (auto& command : commands_->TakeAll()) command();
      continue;
    }
    if (item_links[i] == 0) {
      if (zap_ && items[i].socket == zap_->handle()) {
        HandleZapRequest();
      } else if (router_ && items[i].socket == router_->handle()) {
        ReceiveFromRouter();
      } else if (router_monitor_ && items[i].socket == router_monitor_->handle()) {
        for (int n = 0; n < kMaxMessagesPerPoll && HandleMonitorEvent(*router_monitor_, nullptr);
             ++n) {
        }
      }
      continue;
    }
    Link* link = FindLink(item_links[i]);
    if (link == nullptr) continue;
    if (items[i].socket == link->socket->handle()) {
      if (items[i].revents & ZMQ_POLLOUT) link->blocked = false;
      if (items[i].revents & ZMQ_POLLIN) ReceiveFromLink(*link);
    } else {
      HandleMonitorEvent(*link->monitor, link);
    }
  }

  for (auto& [id, link] : links_) {
    if (link->state == Link::State::kDead) continue;
    ReturnCredit(*link);
    if (link->HasOutput() && !(link->outbound && link->blocked)) Flush(*link);
  }
  if (Clock::now() >= next_sweep_) {
    SweepTimers();
    next_sweep_ = Clock::now() + kSweepInterval;
  }
}

// ---------------------------------------------------------------------------------------------
// Receiving.

void NodeImpl::ReceiveFromRouter() {
  for (int n = 0; n < kMaxMessagesPerPoll; ++n) {
    auto frames = ReceiveMultipart(*router_);
    if (frames.size() < 2) return;  // nothing left (a lone routing id frame cannot happen)
    std::string routing_id(static_cast<const char*>(frames[0].data()), frames[0].size());
    frames.erase(frames.begin());
    Link* link = nullptr;
    auto known = link_by_routing_id_.find(routing_id);
    if (known != link_by_routing_id_.end()) link = FindLink(known->second);
    if (link == nullptr) {
      auto created = std::make_unique<Link>();
      created->id = next_link_id_++;
      created->outbound = false;
      created->routing_id = routing_id;
      created->send_credit = options_.link_window_chunks;
      const char* user_id = zmq_msg_gets(frames[0].handle(), "User-Id");
      if (user_id != nullptr) created->authenticated_key = user_id;
      link = created.get();
      link_by_routing_id_[routing_id] = link->id;
      links_[link->id] = std::move(created);
    }
    int fd = zmq_msg_get(frames[0].handle(), ZMQ_SRCFD);
    if (fd >= 0 && link->fd != fd) {
      link->fd = fd;
      // The kernel reuses descriptors: another live inbound link on this one means its connection
      // closed and its DISCONNECTED event has not reached us yet. Close it now and skip that
      // event when it comes, or it would take this new connection down with it.
      for (auto& [id, other] : links_) {
        if (other.get() != link && !other->outbound && other->fd == fd &&
            other->state != Link::State::kDead) {
          FailLink(*other, Status(StatusCode::kUnavailable,
                                  "peer " + other->peer.ToString() + " disconnected"));
          ++stale_disconnects_[fd];
        }
      }
    }
    HandleFrames(*link, frames);
  }
}

void NodeImpl::ReceiveFromLink(Link& link) {
  for (int n = 0; n < kMaxMessagesPerPoll && link.state != Link::State::kDead; ++n) {
    auto frames = ReceiveMultipart(*link.socket);
    if (frames.empty()) return;
    HandleFrames(link, frames);
  }
}

void NodeImpl::HandleZapRequest() {
  auto frames = ReceiveMultipart(*zap_);
  // RFC 27: version, request id, domain, address, routing id, mechanism, credentials...
  auto text = [&](size_t i) { return i < frames.size() ? frames[i].to_string() : std::string(); };
  std::string status = "400", reason = "only CURVE clients are accepted", user_id;
  if (frames.size() >= 7 && text(5) == "CURVE" && frames[6].size() == 32) {
    // Anyone may join the swarm; what matters is that the key is proven, so that the peer id
    // claimed in HELLO can be checked against it.
    status = "200";
    reason = "OK";
    user_id = Hex(frames[6].data(), frames[6].size());
  }
  std::vector<std::string> reply = {"1.0", text(1), status, reason, user_id, ""};
  for (size_t i = 0; i < reply.size(); ++i) {
    zap_->send(zmq::buffer(reply[i]),
               i + 1 < reply.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
  }
}

bool NodeImpl::HandleMonitorEvent(zmq::socket_t& monitor, Link* link) {
  auto frames = ReceiveMultipart(monitor);
  if (frames.empty()) return false;
  if (frames.size() < 2 || frames[0].size() < 6) return true;
  uint16_t event;
  uint32_t value;
  std::memcpy(&event, frames[0].data(), sizeof(event));
  std::memcpy(&value, static_cast<const char*>(frames[0].data()) + 2, sizeof(value));
  std::string endpoint = frames[1].to_string();

  if (link ==
      nullptr) {  // the ROUTER: an inbound connection closed (peer died or heartbeat timeout)
    if (event != ZMQ_EVENT_DISCONNECTED) return true;
    auto stale = stale_disconnects_.find(static_cast<int>(value));
    if (stale != stale_disconnects_.end()) {  // its link was closed when the fd was reused
      if (--stale->second == 0) stale_disconnects_.erase(stale);
      return true;
    }
    for (auto& [id, inbound] : links_) {
      if (!inbound->outbound && inbound->fd == static_cast<int>(value) &&
          inbound->state != Link::State::kDead) {
        FailLink(*inbound, Status(StatusCode::kUnavailable,
                                  "peer " + inbound->peer.ToString() + " disconnected"));
      }
    }
    return true;
  }
  std::string where = link->endpoints[link->endpoint_index].ToString();
  switch (event) {
    case ZMQ_EVENT_CONNECT_RETRIED:
      // The connection was refused or unreachable. Try the next address; after the last one, fail
      // now rather than at connect_timeout: a dead peer's address is refused at once, and callers
      // (DHT lookups above all) must not wait seconds to learn it.
      if (link->state != Link::State::kConnecting) return true;
      if (link->endpoint_index + 1 < link->endpoints.size()) {
        ++link->endpoint_index;
        Status reconnected = ConnectToCurrentEndpoint(*link);
        if (!reconnected.ok()) FailLink(*link, reconnected);
      } else {
        FailLink(*link, Status(StatusCode::kUnavailable,
                               "cannot connect to peer " + link->peer.ToString() +
                                   ": nothing accepts connections at " + where));
      }
      return true;
    case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
    case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
      FailLink(*link,
               Status(StatusCode::kUnavailable,
                      "the secure handshake with " + where +
                          " failed: the peer there does "
                          "not hold the key of " +
                          link->peer.ToString() + ", or its encryption setting differs from ours"));
      return true;
    case ZMQ_EVENT_DISCONNECTED:
      if (link->state == Link::State::kReady) {
        FailLink(*link, Status(StatusCode::kUnavailable,
                               "peer " + link->peer.ToString() + " disconnected"));
      } else if (++link->handshake_disconnects < kMaxHandshakeDisconnects) {
        // Closed before HELLO_ACK: a listener that does not hold the expected key does this
        // every time, but so can an overloaded one once. No call has been sent yet, so a fresh
        // connection loses nothing.
        Status reconnected = ConnectToCurrentEndpoint(*link);
        if (!reconnected.ok()) FailLink(*link, reconnected);
      } else {
        FailLink(*link, Status(StatusCode::kUnavailable,
                               "the peer at " + where + " closed the connection during the " +
                                   "handshake " + std::to_string(kMaxHandshakeDisconnects) +
                                   " times: it is not " + link->peer.ToString() +
                                   ", or its encryption setting differs from ours"));
      }
      return true;
    default:
      return true;
  }
}

void NodeImpl::HandleFrames(Link& link, std::vector<zmq::message_t>& frames) {
  // Every message with payload bytes used one unit of the sender's credit; give it back whatever
  // becomes of the message, or an honest sender would stall.
  if (frames.size() > 1) ++link.credit_to_return;
  // The socket's message size cap bounds what is parsed here; the header limit is checked after
  // parsing so that the caller hears why its message was refused.
  wire::Envelope envelope;
  if (!envelope.ParseFromArray(frames[0].data(), static_cast<int>(frames[0].size()))) {
    HM_LOG(kWarning) << "dropped a malformed message from " << link.peer.ToString();
    return;
  }
  if (!link.outbound && !link.peer_verified && envelope.kind() != wire::HELLO) {
    RefuseMessage(link, envelope,
                  Status(StatusCode::kPermissionDenied,
                         "this connection has no accepted HELLO; its messages are refused"));
    return;
  }
  switch (envelope.kind()) {
    case wire::HELLO:
      if (!link.outbound) HandleHello(link, envelope);
      return;
    case wire::HELLO_ACK:
      if (link.outbound) HandleHelloAck(link, envelope);
      return;
    case wire::REQUEST:
    case wire::RESPONSE:
    case wire::STREAM_OPEN:
    case wire::STREAM_DATA:
      HandleMessage(link, std::move(envelope), frames);
      return;
    case wire::CONTINUATION:
      HandleContinuation(link, envelope, frames);
      return;
    case wire::CANCEL:
      HandleCancel(link, envelope);
      return;
    case wire::STREAM_CLOSE:
      HandleStreamClose(link, envelope);
      return;
    case wire::CREDIT:
      HandleCredit(link, envelope);
      return;
    default:
      HM_LOG(kWarning) << "dropped a message of unknown kind " << envelope.kind() << " from "
                       << link.peer.ToString();
      return;
  }
}

void NodeImpl::HandleHello(Link& link, const wire::Envelope& envelope) {
  const wire::Hello& hello = envelope.hello();
  Status refusal;
  auto claimed = PeerId::FromBytes(hello.peer_id());
  if (link.peer_verified) {
    refusal = Status(StatusCode::kProtocolError, "a second HELLO on one connection");
  } else if (hello.protocol_version() < kMinCompatibleProtocolVersion ||
             hello.min_compatible_version() > kProtocolVersion) {
    refusal = Status(StatusCode::kFailedPrecondition,
                     "protocol version " + std::to_string(hello.protocol_version()) +
                         " cannot talk to this peer's version " + std::to_string(kProtocolVersion));
  } else if (!claimed.ok()) {
    refusal = claimed.status().WithContext("HELLO");
  } else if (options_.encryption) {
    auto curve = claimed->CurvePublicKey();
    if (!curve.ok() || Hex(curve->data(), curve->size()) != link.authenticated_key) {
      refusal = Status(StatusCode::kPermissionDenied, "the connection claims to be peer " +
                                                          claimed->ToString() +
                                                          " but authenticated with another key");
    }
  }
  wire::Envelope ack;
  ack.set_kind(wire::HELLO_ACK);
  ack.mutable_hello()->set_protocol_version(kProtocolVersion);
  ack.mutable_hello()->set_min_compatible_version(kMinCompatibleProtocolVersion);
  ack.mutable_hello()->set_peer_id(std::string(identity_.peer_id().raw()));
  if (!refusal.ok()) {
    HM_LOG(kWarning) << "refused a connection: " << refusal.ToString();
    *ack.mutable_status() = ToWire(refusal);
    SendControl(link, ack);
    return;
  }
  link.peer = *claimed;
  link.peer_verified = true;
  link.peer_client_mode = hello.client_mode();
  link.state = Link::State::kReady;
  auto& known = address_book_[link.peer];
  for (const auto& text : hello.addresses()) {
    auto address = PeerAddress::Parse(text);
    if (!address.ok() || address->peer_id != link.peer) continue;
    const Endpoint& endpoint = address->endpoints.front();
    if (known.size() < kMaxAddressesPerPeer &&
        std::find(known.begin(), known.end(), endpoint) == known.end()) {
      known.push_back(endpoint);
    }
  }
  SetPeerLink(link.peer, link.id);
  SendControl(link, ack);
  HM_LOG(kDebug) << "accepted a connection from " << link.peer.ToString();
}

void NodeImpl::HandleHelloAck(Link& link, const wire::Envelope& envelope) {
  Status refused = FromWire(envelope.status());
  if (!refused.ok()) {
    FailLink(link, refused.WithContext("peer " + link.peer.ToString() + " refused the connection"));
    return;
  }
  auto answered = PeerId::FromBytes(envelope.hello().peer_id());
  if (!answered.ok() || *answered != link.peer) {
    FailLink(link, Status(StatusCode::kPermissionDenied,
                          "expected peer " + link.peer.ToString() + " at " +
                              link.endpoints[link.endpoint_index].ToString() +
                              ", but another peer answered"));
    return;
  }
  if (envelope.hello().min_compatible_version() > kProtocolVersion) {
    FailLink(link, Status(StatusCode::kFailedPrecondition,
                          "peer " + link.peer.ToString() + " needs protocol version " +
                              std::to_string(envelope.hello().min_compatible_version()) +
                              " or newer; this node speaks " + std::to_string(kProtocolVersion)));
    return;
  }
  link.state = Link::State::kReady;
  UpdateConnectedPeers();
  Flush(link);
}

void NodeImpl::HandleMessage(Link& link, wire::Envelope envelope,
                             std::vector<zmq::message_t>& frames) {
  uint64_t key = CallKey(envelope.call_id(), envelope.from_caller());
  uint32_t chunks = std::max<uint32_t>(1, envelope.chunk_count());
  if (link.pending.count(key) != 0) {
    RefuseMessage(link, envelope,
                  Status(StatusCode::kProtocolError,
                         "a new message started before the previous one of the call ended"));
    return;
  }
  wire::Envelope copy_for_refusal;
  copy_for_refusal.set_kind(envelope.kind());
  copy_for_refusal.set_call_id(envelope.call_id());
  copy_for_refusal.set_from_caller(envelope.from_caller());
  copy_for_refusal.set_method(envelope.method());
  auto assembly = Reassembly::Start(std::move(envelope), frames, limits_);
  if (!assembly.ok()) {
    RefuseMessage(link, copy_for_refusal, assembly.status());
    if (chunks > 1) link.pending[key] = Link::Pending{std::nullopt, chunks - 1};
    return;
  }
  if (assembly->complete()) {
    Dispatch(link, assembly->envelope(), assembly->TakeMessage());
    return;
  }
  // A chunked message occupies memory until its last chunk: cap what one link may hold.
  if (link.pending_bytes + assembly->total_bytes() > 2 * options_.max_message_bytes) {
    RefuseMessage(link, copy_for_refusal,
                  Status(StatusCode::kResourceExhausted,
                         "too many large messages in progress on one connection"));
    link.pending[key] = Link::Pending{std::nullopt, chunks - 1};
    return;
  }
  link.pending_bytes += assembly->total_bytes();
  link.pending[key] = Link::Pending{std::move(*assembly), chunks - 1};
}

void NodeImpl::HandleContinuation(Link& link, const wire::Envelope& envelope,
                                  std::vector<zmq::message_t>& frames) {
  auto it = link.pending.find(CallKey(envelope.call_id(), envelope.from_caller()));
  if (it == link.pending.end()) {
    HM_LOG(kWarning) << "dropped a chunk of an unknown message from " << link.peer.ToString();
    return;
  }
  Link::Pending& pending = it->second;
  --pending.chunks_left;
  if (!pending.assembly) {  // the message was refused: skip the rest of it
    if (pending.chunks_left == 0) link.pending.erase(it);
    return;
  }
  Status added = pending.assembly->Continue(envelope, frames);
  if (!added.ok() || pending.assembly->complete()) {
    link.pending_bytes -= pending.assembly->total_bytes();
    Reassembly assembly = std::move(*pending.assembly);
    if (!added.ok() && pending.chunks_left > 0) {
      pending.assembly.reset();
    } else {
      link.pending.erase(it);
    }
    if (!added.ok()) {
      RefuseMessage(link, assembly.envelope(), added);
    } else {
      Dispatch(link, assembly.envelope(), assembly.TakeMessage());
    }
  }
}

void NodeImpl::RefuseMessage(Link& link, const wire::Envelope& envelope, const Status& status) {
  HM_LOG(kInfo) << "refused a message from " << link.peer.ToString() << ": " << status.ToString();
  uint64_t call_id = envelope.call_id();
  wire::Envelope reply;
  reply.set_call_id(call_id);
  *reply.mutable_status() = ToWire(status);
  switch (envelope.kind()) {
    case wire::REQUEST:
      reply.set_kind(wire::RESPONSE);
      reply.set_from_caller(false);
      Enqueue(link, reply, {});
      return;
    case wire::STREAM_OPEN:
      reply.set_kind(wire::STREAM_CLOSE);
      reply.set_from_caller(false);
      Enqueue(link, reply, {});
      return;
    case wire::STREAM_DATA:
      if (envelope.from_caller()) {  // we serve this stream
        auto it = served_streams_.find({link.id, call_id});
        if (it != served_streams_.end()) {
          it->second.cancelled->store(true);
          it->second.stream->Fail(status);
        }
        reply.set_kind(wire::STREAM_CLOSE);
        reply.set_from_caller(false);
      } else {
        auto it = out_streams_.find(call_id);
        if (it != out_streams_.end() && it->second.link_id == link.id) {
          it->second.stream->Fail(
              status.WithContext("a message from peer " + link.peer.ToString()));
          out_streams_.erase(it);
        }
        reply.set_kind(wire::CANCEL);
        reply.set_from_caller(true);
      }
      Enqueue(link, reply, {});
      return;
    case wire::RESPONSE: {
      auto it = out_calls_.find(call_id);
      if (it != out_calls_.end() && it->second.link_id == link.id) {
        CompleteOutCall(call_id, status.WithContext("the reply from peer " + link.peer.ToString()));
      }
      return;
    }
    default:
      return;
  }
}

void NodeImpl::Dispatch(Link& link, const wire::Envelope& envelope, Message message) {
  uint64_t call_id = envelope.call_id();
  switch (envelope.kind()) {
    case wire::REQUEST:
      DispatchRequest(link, envelope, std::move(message));
      return;
    case wire::STREAM_OPEN:
      DispatchStreamOpen(link, envelope);
      return;
    case wire::STREAM_DATA:
      if (envelope.from_caller()) {
        auto it = served_streams_.find({link.id, call_id});
        if (it != served_streams_.end()) it->second.stream->OnData(std::move(message));
      } else {
        auto it = out_streams_.find(call_id);
        if (it != out_streams_.end() && it->second.link_id == link.id) {
          it->second.stream->OnData(std::move(message));
        }
      }
      return;
    case wire::RESPONSE: {
      auto it = out_calls_.find(call_id);
      if (it == out_calls_.end() || it->second.link_id != link.id)
        return;  // timed out or cancelled
      Status remote = FromWire(envelope.status());
      if (!remote.ok()) {
        CompleteOutCall(call_id, remote.WithContext("'" + it->second.method + "' on peer " +
                                                    link.peer.ToString()));
      } else {
        CompleteOutCall(call_id, std::move(message));
      }
      return;
    }
    default:
      return;
  }
}

void NodeImpl::DispatchRequest(Link& link, const wire::Envelope& envelope, Message message) {
  if (link.inflight_requests >= options_.max_inflight_requests_per_peer) {
    RefuseMessage(link, envelope,
                  Status(StatusCode::kResourceExhausted,
                         "more than " + std::to_string(options_.max_inflight_requests_per_peer) +
                             " requests from one peer in progress"));
    return;
  }
  UnaryHandler handler;
  {
    std::lock_guard<std::mutex> lock(handlers_mutex_);
    auto it = unary_handlers_.find(envelope.method());
    if (it != unary_handlers_.end()) handler = it->second;
  }
  if (!handler) {
    RefuseMessage(link, envelope,
                  Status(StatusCode::kNotFound, "no method '" + envelope.method() + "' here"));
    return;
  }
  auto timeout = envelope.timeout_ms() > 0 ? Milliseconds(envelope.timeout_ms())
                                           : options_.default_call_timeout;
  InCall call{Clock::now() + timeout, std::make_shared<std::atomic<bool>>(false)};
  in_calls_[{link.id, envelope.call_id()}] = call;
  ++link.inflight_requests;

  CallContext context{link.peer, envelope.method(), call.deadline, call.cancelled};
  auto answered = std::make_shared<std::atomic<bool>>(false);
  Responder respond = [queue = commands_, this, link_id = link.id, call_id = envelope.call_id(),
                       answered](Result<Message> result) {
    if (answered->exchange(true)) return;  // only the first answer counts
    auto shared = std::make_shared<Result<Message>>(std::move(result));
    queue->Post(
        [this, link_id, call_id, shared] { Respond(link_id, call_id, std::move(*shared)); });
  };
  auto request = std::make_shared<Message>(std::move(message));
  pool_->Post([handler, context, request, respond] {
    try {
      handler(context, std::move(*request), respond);
    } catch (const std::exception& error) {
      respond(Status(StatusCode::kInternal,
                     "the handler of '" + context.method + "' threw: " + error.what()));
    } catch (...) {
      respond(Status(StatusCode::kInternal, "the handler of '" + context.method + "' threw"));
    }
  });
}

void NodeImpl::DispatchStreamOpen(Link& link, const wire::Envelope& envelope) {
  if (link.inbound_streams >= options_.max_inbound_streams_per_peer) {
    RefuseMessage(link, envelope,
                  Status(StatusCode::kResourceExhausted,
                         "more than " + std::to_string(options_.max_inbound_streams_per_peer) +
                             " streams from one peer open at once"));
    return;
  }
  StreamHandler handler;
  {
    std::lock_guard<std::mutex> lock(handlers_mutex_);
    auto it = stream_handlers_.find(envelope.method());
    if (it != stream_handlers_.end()) handler = it->second;
  }
  if (!handler) {
    RefuseMessage(
        link, envelope,
        Status(StatusCode::kNotFound, "no stream method '" + envelope.method() + "' here"));
    return;
  }
  auto timeout = envelope.timeout_ms() > 0 ? Milliseconds(envelope.timeout_ms())
                                           : options_.default_call_timeout;
  auto stream = std::make_shared<StreamImpl>(
      link.peer, link.id, envelope.call_id(), false, options_.stream_window_messages, commands_,
      pool_, this, MessageLimits{options_.max_header_bytes, options_.max_message_bytes});
  ServedStream served{stream, Clock::now() + timeout, std::make_shared<std::atomic<bool>>(false)};
  served_streams_[{link.id, envelope.call_id()}] = served;
  ++link.inbound_streams;

  CallContext context{link.peer, envelope.method(), served.deadline, served.cancelled};
  auto done = std::make_shared<std::atomic<bool>>(false);
  std::thread thread([this, handler, context, stream, done, queue = commands_,
                      key = std::make_pair(link.id, envelope.call_id())] {
    Status result;
    try {
      result = handler(context, *stream);
    } catch (const std::exception& error) {
      result = Status(StatusCode::kInternal,
                      "the handler of '" + context.method + "' threw: " + error.what());
    } catch (...) {
      result = Status(StatusCode::kInternal, "the handler of '" + context.method + "' threw");
    }
    stream->FinishFromHandler(result);
    queue->Post([this, key] { FinishServedStream(key.first, key.second); });
    done->store(true);
  });
  handler_threads_.push_back(HandlerThread{std::move(thread), done});
}

void NodeImpl::HandleCancel(Link& link, const wire::Envelope& envelope) {
  std::pair<uint64_t, uint64_t> key{link.id, envelope.call_id()};
  auto call = in_calls_.find(key);
  if (call != in_calls_.end()) {
    call->second.cancelled->store(true);
    in_calls_.erase(call);
    --link.inflight_requests;
  }
  auto served = served_streams_.find(key);
  if (served != served_streams_.end()) {
    served->second.cancelled->store(true);
    served->second.stream->Fail(Status(StatusCode::kCancelled, "the caller cancelled the stream"));
  }
}

void NodeImpl::HandleStreamClose(Link& link, const wire::Envelope& envelope) {
  Status status = FromWire(envelope.status());
  if (envelope.from_caller()) {
    auto it = served_streams_.find({link.id, envelope.call_id()});
    if (it != served_streams_.end()) it->second.stream->OnRemoteClose(status);
    return;
  }
  auto it = out_streams_.find(envelope.call_id());
  if (it == out_streams_.end() || it->second.link_id != link.id) return;
  it->second.stream->OnRemoteClose(
      status.ok() ? status : status.WithContext("stream on peer " + link.peer.ToString()));
  out_streams_.erase(it);
}

void NodeImpl::HandleCredit(Link& link, const wire::Envelope& envelope) {
  int credits = static_cast<int>(std::min<uint32_t>(envelope.credits(), 1 << 20));
  if (envelope.call_id() == 0) {
    link.send_credit = std::min(link.send_credit + credits, 1 << 20);
    Flush(link);
    return;
  }
  if (envelope.from_caller()) {
    auto it = served_streams_.find({link.id, envelope.call_id()});
    if (it != served_streams_.end()) it->second.stream->OnCredit(credits);
  } else {
    auto it = out_streams_.find(envelope.call_id());
    if (it != out_streams_.end() && it->second.link_id == link.id) {
      it->second.stream->OnCredit(credits);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Links.

Link* NodeImpl::FindLink(uint64_t link_id) {
  auto it = links_.find(link_id);
  if (it == links_.end() || it->second->state == Link::State::kDead) return nullptr;
  return it->second.get();
}

Result<Link*> NodeImpl::LinkFor(const PeerAddress& peer) {
  if (peer.peer_id == identity_.peer_id()) {
    return Status(StatusCode::kInvalidArgument, "a node cannot call itself");
  }
  auto existing = link_by_peer_.find(peer.peer_id);
  if (existing != link_by_peer_.end()) {
    if (Link* link = FindLink(existing->second)) return link;
  }
  std::vector<Endpoint> endpoints = peer.endpoints;
  if (endpoints.empty()) {
    auto known = address_book_.find(peer.peer_id);
    if (known != address_book_.end()) endpoints = known->second;
  }
  if (endpoints.empty()) {
    return Status(StatusCode::kUnavailable, "no connection to peer " + peer.peer_id.ToString() +
                                                " and no address to reach it");
  }
  return Dial(peer.peer_id, std::move(endpoints));
}

Result<Link*> NodeImpl::Dial(const PeerId& peer, std::vector<Endpoint> endpoints) {
  auto link = std::make_unique<Link>();
  link->id = next_link_id_++;
  link->outbound = true;
  link->peer = peer;
  link->endpoints = std::move(endpoints);
  link->send_credit = options_.link_window_chunks;
  link->connect_deadline = Clock::now() + options_.connect_timeout;
  Status connected = ConnectToCurrentEndpoint(*link);
  if (!connected.ok()) return connected;
  Link* raw = link.get();
  links_[raw->id] = std::move(link);
  SetPeerLink(peer, raw->id);
  return raw;
}

Status NodeImpl::ConnectToCurrentEndpoint(Link& link) {
  const Endpoint& endpoint = link.endpoints[link.endpoint_index];
  try {
    auto socket = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::dealer);
    ApplyConnectionOptions(*socket, options_);
    if (options_.encryption) {
      auto server_key = link.peer.CurvePublicKey();
      if (!server_key.ok()) return server_key.status();
      socket->set(zmq::sockopt::curve_serverkey, zmq::const_buffer(server_key->data(), 32));
      socket->set(zmq::sockopt::curve_publickey,
                  zmq::const_buffer(identity_.curve_public_key().data(), 32));
      socket->set(zmq::sockopt::curve_secretkey,
                  zmq::const_buffer(identity_.curve_secret_key().data(), 32));
    }
    // Unique per attempt: the previous attempt's monitor may still be bound while it closes.
    std::string monitor_name = "inproc://hivemind-monitor-" + std::to_string(link.id) + "-" +
                               std::to_string(++link.connection_attempts);
    if (zmq_socket_monitor(socket->handle(), monitor_name.c_str(),
                           ZMQ_EVENT_CONNECT_RETRIED | ZMQ_EVENT_DISCONNECTED |
                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0) {
      throw zmq::error_t();
    }
    auto monitor = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::pair);
    monitor->set(zmq::sockopt::linger, 0);
    monitor->connect(monitor_name);
    socket->connect(endpoint.ZmqEndpoint());
    link.CloseSocket();  // the previous attempt's
    link.socket = std::move(socket);
    link.monitor = std::move(monitor);
  } catch (const zmq::error_t& error) {
    return Status(StatusCode::kUnavailable,
                  "cannot connect to " + endpoint.ToString() + ": " + error.what());
  }
  // A new connection starts with HELLO; anything queued for calls waits for the answer.
  link.staged.clear();
  link.control.clear();
  link.blocked = false;
  wire::Envelope hello;
  hello.set_kind(wire::HELLO);
  hello.mutable_hello()->set_protocol_version(kProtocolVersion);
  hello.mutable_hello()->set_min_compatible_version(kMinCompatibleProtocolVersion);
  hello.mutable_hello()->set_peer_id(std::string(identity_.peer_id().raw()));
  hello.mutable_hello()->set_client_mode(options_.client_mode);
  for (const auto& text : visible_.ToStrings()) hello.mutable_hello()->add_addresses(text);
  SendControl(link, hello);
  return Status::Ok();
}

void NodeImpl::SetPeerLink(const PeerId& peer, uint64_t link_id) {
  link_by_peer_[peer] = link_id;
  UpdateConnectedPeers();
}

void NodeImpl::FailLink(Link& link, const Status& status) {
  if (link.state == Link::State::kDead) return;
  HM_LOG(kInfo) << "connection to " << link.peer.ToString() << " closed: " << status.ToString();
  link.state = Link::State::kDead;
  std::vector<uint64_t> calls;
  for (auto& [id, call] : out_calls_) {
    if (call.link_id == link.id) calls.push_back(id);
  }
  for (uint64_t id : calls) CompleteOutCall(id, status);
  for (auto it = out_streams_.begin(); it != out_streams_.end();) {
    if (it->second.link_id != link.id) {
      ++it;
      continue;
    }
    it->second.stream->Fail(status);
    it = out_streams_.erase(it);
  }
  for (auto it = served_streams_.begin(); it != served_streams_.end();) {
    if (it->first.first != link.id) {
      ++it;
      continue;
    }
    it->second.cancelled->store(true);
    it->second.stream->Fail(status);
    it = served_streams_.erase(it);
  }
  for (auto it = in_calls_.begin(); it != in_calls_.end();) {
    if (it->first.first != link.id) {
      ++it;
      continue;
    }
    it->second.cancelled->store(true);
    it = in_calls_.erase(it);
  }
  link.pending.clear();
  link.call_queues.clear();
  link.call_ring.clear();
  link.control.clear();
  link.staged.clear();
  link.CloseSocket();
  if (!link.outbound) link_by_routing_id_.erase(link.routing_id);
  auto primary = link_by_peer_.find(link.peer);
  if (primary != link_by_peer_.end() && primary->second == link.id) {
    link_by_peer_.erase(primary);
    for (auto& [id, other] : links_) {  // another live connection to the same peer takes over
      if (other->state == Link::State::kReady && other->peer == link.peer) {
        link_by_peer_[link.peer] = id;
        break;
      }
    }
  }
  UpdateConnectedPeers();
}

void NodeImpl::UpdateConnectedPeers() {
  std::vector<PeerId> peers;
  for (auto& [id, link] : links_) {
    if (link->state != Link::State::kReady) continue;
    if (std::find(peers.begin(), peers.end(), link->peer) == peers.end()) {
      peers.push_back(link->peer);
    }
  }
  std::lock_guard<std::mutex> lock(peers_mutex_);
  connected_peers_ = std::move(peers);
}

// ---------------------------------------------------------------------------------------------
// Sending.

void NodeImpl::SendControl(Link& link, const wire::Envelope& envelope) {
  std::vector<zmq::message_t> frames;
  frames.push_back(SerializeFrame(envelope));
  link.control.push_back(std::move(frames));
  Flush(link);
}

void NodeImpl::Enqueue(Link& link, wire::Envelope envelope, std::vector<Payload> payloads) {
  uint64_t key = CallKey(envelope.call_id(), envelope.from_caller());
  auto& queue = link.call_queues[key];
  if (queue.empty()) link.call_ring.push_back(key);
  queue.emplace_back(std::move(envelope), std::move(payloads), options_.chunk_bytes);
  Flush(link);
}

bool NodeImpl::SendFrames(Link& link, std::vector<zmq::message_t>& frames) {
  zmq::socket_t& socket = link.outbound ? *link.socket : *router_;
  try {
    if (!link.outbound) {
      auto sent = socket.send(zmq::buffer(link.routing_id),
                              zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      if (!sent) return false;  // the peer's pipe is full: retry later
    }
    for (size_t i = 0; i < frames.size(); ++i) {
      auto flags = zmq::send_flags::dontwait;
      if (i + 1 < frames.size()) flags = flags | zmq::send_flags::sndmore;
      auto sent = socket.send(frames[i], flags);
      if (!sent) {
        if (i == 0 && link.outbound) return false;
        // Parts of a message are accepted once its first part was; a refusal now means the
        // connection is gone.
        FailLink(link, Status(StatusCode::kUnavailable,
                              "peer " + link.peer.ToString() + " stopped accepting data"));
        return false;
      }
    }
  } catch (const zmq::error_t& error) {
    FailLink(link, Status(StatusCode::kUnavailable,
                          "peer " + link.peer.ToString() + " is unreachable: " + error.what()));
    return false;
  }
  frames.clear();
  return true;
}

void NodeImpl::Flush(Link& link) {
  if (link.state == Link::State::kDead || (link.outbound && link.blocked)) return;
  auto send = [&](std::vector<zmq::message_t>& frames, bool costs_credit) {
    if (SendFrames(link, frames)) {
      if (costs_credit) --link.send_credit;
      return true;
    }
    if (link.state != Link::State::kDead && link.staged.empty() && !frames.empty()) {
      link.staged = std::move(frames);
      link.staged_costs_credit = costs_credit;
    }
    link.blocked = link.state != Link::State::kDead;
    return false;
  };
  if (!link.staged.empty()) {
    std::vector<zmq::message_t> staged = std::move(link.staged);
    link.staged.clear();
    if (!send(staged, link.staged_costs_credit)) return;
  }
  while (!link.control.empty()) {
    std::vector<zmq::message_t> frames = std::move(link.control.front());
    link.control.pop_front();
    if (!send(frames, false)) return;
  }
  // Calls wait until the dialed peer has proven who it is.
  if (link.outbound && link.state != Link::State::kReady) return;
  size_t skipped = 0;  // calls passed over for lack of credit in this round
  while (!link.call_ring.empty() && skipped < link.call_ring.size()) {
    uint64_t key = link.call_ring.front();
    link.call_ring.pop_front();
    auto& queue = link.call_queues[key];
    OutgoingMessage& message = queue.front();
    bool costs_credit = message.next_chunk_has_payload();
    if (costs_credit && link.send_credit <= 0) {
      link.call_ring.push_back(key);  // a message without payload further on may still go
      ++skipped;
      continue;
    }
    skipped = 0;
    std::vector<zmq::message_t> frames = message.NextChunk();
    if (message.done()) queue.pop_front();
    if (queue.empty()) {
      link.call_queues.erase(key);
    } else {
      link.call_ring.push_back(key);
    }
    if (!send(frames, costs_credit)) return;
  }
}

void NodeImpl::ReturnCredit(Link& link) {
  if (link.credit_to_return == 0) return;
  wire::Envelope credit;
  credit.set_kind(wire::CREDIT);
  credit.set_credits(static_cast<uint32_t>(link.credit_to_return));
  link.credit_to_return = 0;
  SendControl(link, credit);
}

// ---------------------------------------------------------------------------------------------
// Calls and streams.

void NodeImpl::StartCall(uint64_t call_id, PeerAddress peer, std::string method, Message request,
                         TimePoint deadline, Milliseconds timeout, Promise<Message> promise) {
  if (stopping_) {
    pool_->Post(
        [promise] { promise.Set(Status(StatusCode::kCancelled, "the node is shut down")); });
    return;
  }
  auto link = LinkFor(peer);
  if (!link.ok()) {
    Status failed = link.status().WithContext("call '" + method + "'");
    pool_->Post([promise, failed] { promise.Set(failed); });
    return;
  }
  out_calls_[call_id] = OutCall{(*link)->id, peer.peer_id, method, deadline, timeout, promise};
  wire::Envelope envelope;
  envelope.set_kind(wire::REQUEST);
  envelope.set_call_id(call_id);
  envelope.set_from_caller(true);
  envelope.set_method(method);
  envelope.set_timeout_ms(
      static_cast<uint32_t>(std::max<long long>(1, MillisecondsBetween(Clock::now(), deadline))));
  envelope.set_header(std::move(request.header));
  Enqueue(**link, std::move(envelope), std::move(request.payloads));
}

void NodeImpl::StartStream(std::shared_ptr<StreamImpl> stream, PeerAddress peer, std::string method,
                           TimePoint deadline, Milliseconds timeout) {
  if (stopping_) {
    stream->Fail(Status(StatusCode::kCancelled, "the node is shut down"));
    return;
  }
  auto link = LinkFor(peer);
  if (!link.ok()) {
    stream->Fail(link.status().WithContext("stream '" + method + "'"));
    return;
  }
  out_streams_[stream->call_id()] = OutStream{stream, (*link)->id, deadline, timeout, method};
  wire::Envelope envelope;
  envelope.set_kind(wire::STREAM_OPEN);
  envelope.set_call_id(stream->call_id());
  envelope.set_from_caller(true);
  envelope.set_method(method);
  envelope.set_timeout_ms(
      static_cast<uint32_t>(std::max<long long>(1, MillisecondsBetween(Clock::now(), deadline))));
  Enqueue(**link, std::move(envelope), {});
}

void NodeImpl::CompleteOutCall(uint64_t call_id, Result<Message> result) {
  auto it = out_calls_.find(call_id);
  if (it == out_calls_.end()) return;
  Promise<Message> promise = it->second.promise;
  out_calls_.erase(it);
  promise.SetWithCallbacksOn(std::move(result),
                             [pool = pool_](std::function<void()> task) { pool->Post(task); });
}

void NodeImpl::Respond(uint64_t link_id, uint64_t call_id, Result<Message> result) {
  auto it = in_calls_.find({link_id, call_id});
  if (it == in_calls_.end()) return;  // cancelled, timed out, or the caller is gone
  in_calls_.erase(it);
  Link* link = FindLink(link_id);
  if (link == nullptr) return;
  --link->inflight_requests;
  wire::Envelope envelope;
  envelope.set_kind(wire::RESPONSE);
  envelope.set_call_id(call_id);
  envelope.set_from_caller(false);
  std::vector<Payload> payloads;
  Status status = result.ok() ? limits_.Check(result.value()) : result.status();
  if (!status.ok()) {
    *envelope.mutable_status() = ToWire(status);
  } else {
    envelope.set_header(std::move(result.value().header));
    payloads = std::move(result.value().payloads);
  }
  Enqueue(*link, std::move(envelope), std::move(payloads));
}

void NodeImpl::FinishServedStream(uint64_t link_id, uint64_t call_id) {
  auto it = served_streams_.find({link_id, call_id});
  if (it == served_streams_.end()) return;
  it->second.handler_done = true;
  if (it->second.stream->finished_locally()) EraseServedStream(it);
}

void NodeImpl::EraseServedStream(ServedStreams::iterator it) {
  if (Link* link = FindLink(it->first.first)) --link->inbound_streams;
  served_streams_.erase(it);
}

Link* NodeImpl::LinkOfStream(StreamImpl& stream) {
  if (!stream.we_called()) return FindLink(stream.link_id());
  auto it = out_streams_.find(stream.call_id());
  return it == out_streams_.end() ? nullptr : FindLink(it->second.link_id);
}

void NodeImpl::SendStreamData(StreamImpl& stream, Message message) {
  Link* link = LinkOfStream(stream);
  if (link == nullptr) return;  // the stream already ended; its writer was told
  wire::Envelope envelope;
  envelope.set_kind(wire::STREAM_DATA);
  envelope.set_call_id(stream.call_id());
  envelope.set_from_caller(stream.we_called());
  envelope.set_header(std::move(message.header));
  Enqueue(*link, std::move(envelope), std::move(message.payloads));
}

void NodeImpl::SendStreamClose(StreamImpl& stream, Status status) {
  Link* link = LinkOfStream(stream);
  if (link == nullptr) return;
  wire::Envelope envelope;
  envelope.set_kind(wire::STREAM_CLOSE);
  envelope.set_call_id(stream.call_id());
  envelope.set_from_caller(stream.we_called());
  *envelope.mutable_status() = ToWire(status);
  Enqueue(*link, std::move(envelope), {});
  if (!stream.we_called()) {
    auto it = served_streams_.find({stream.link_id(), stream.call_id()});
    if (it != served_streams_.end() && it->second.handler_done) EraseServedStream(it);
  }
}

void NodeImpl::SendStreamCredit(StreamImpl& stream, int messages) {
  Link* link = LinkOfStream(stream);
  if (link == nullptr) return;
  wire::Envelope envelope;
  envelope.set_kind(wire::CREDIT);
  envelope.set_call_id(stream.call_id());
  envelope.set_from_caller(stream.we_called());
  envelope.set_credits(static_cast<uint32_t>(messages));
  SendControl(*link, envelope);
}

void NodeImpl::AbortStream(StreamImpl& stream, Status status) {
  Link* link = LinkOfStream(stream);
  if (link == nullptr) return;
  wire::Envelope envelope;
  envelope.set_call_id(stream.call_id());
  if (stream.we_called()) {
    envelope.set_kind(wire::CANCEL);
    envelope.set_from_caller(true);
    out_streams_.erase(stream.call_id());
  } else {
    envelope.set_kind(wire::STREAM_CLOSE);
    envelope.set_from_caller(false);
    *envelope.mutable_status() = ToWire(status);
    auto it = served_streams_.find({stream.link_id(), stream.call_id()});
    if (it != served_streams_.end()) it->second.cancelled->store(true);
  }
  Enqueue(*link, std::move(envelope), {});
}

// ---------------------------------------------------------------------------------------------
// Timers.

void NodeImpl::SweepTimers() {
  auto now = Clock::now();
  std::vector<uint64_t> expired;
  for (auto& [id, call] : out_calls_) {
    if (call.deadline <= now) expired.push_back(id);
  }
  for (uint64_t id : expired) {
    const OutCall& call = out_calls_[id];
    Status timed_out(StatusCode::kDeadlineExceeded,
                     "call '" + call.method + "' to peer " + call.peer.ToString() +
                         " got no answer within " + std::to_string(call.timeout.count()) + " ms");
    if (Link* link = FindLink(call.link_id)) {
      wire::Envelope cancel;
      cancel.set_kind(wire::CANCEL);
      cancel.set_call_id(id);
      cancel.set_from_caller(true);
      Enqueue(*link, cancel, {});
    }
    CompleteOutCall(id, timed_out);
  }
  for (auto it = out_streams_.begin(); it != out_streams_.end();) {
    if (it->second.deadline > now) {
      ++it;
      continue;
    }
    it->second.stream->Fail(Status(
        StatusCode::kDeadlineExceeded,
        "stream '" + it->second.method + "' to peer " + it->second.stream->peer().ToString() +
            " passed its " + std::to_string(it->second.timeout.count()) + " ms deadline"));
    if (Link* link = FindLink(it->second.link_id)) {
      wire::Envelope cancel;
      cancel.set_kind(wire::CANCEL);
      cancel.set_call_id(it->first);
      cancel.set_from_caller(true);
      Enqueue(*link, cancel, {});
    }
    it = out_streams_.erase(it);
  }
  for (auto it = in_calls_.begin(); it != in_calls_.end();) {
    if (it->second.deadline > now) {
      ++it;
      continue;
    }
    it->second.cancelled->store(true);
    if (Link* link = FindLink(it->first.first)) --link->inflight_requests;
    it = in_calls_.erase(it);
  }
  for (auto& [key, served] : served_streams_) {
    if (served.deadline <= now && !served.cancelled->exchange(true)) {
      served.stream->Fail(
          Status(StatusCode::kDeadlineExceeded, "the stream passed the caller's deadline"));
    }
  }
  for (auto& [id, link] : links_) {
    if (link->outbound && link->state == Link::State::kConnecting &&
        link->connect_deadline <= now) {
      FailLink(*link, Status(StatusCode::kUnavailable,
                             "no answer from peer " + link->peer.ToString() + " at " +
                                 link->endpoints[link->endpoint_index].ToString() + " within " +
                                 std::to_string(options_.connect_timeout.count()) + " ms"));
    }
  }
  for (auto it = links_.begin(); it != links_.end();) {
    it = it->second->state == Link::State::kDead ? links_.erase(it) : std::next(it);
  }
  ReapHandlerThreads(false);
}

void NodeImpl::ReapHandlerThreads(bool all) {
  for (auto it = handler_threads_.begin(); it != handler_threads_.end();) {
    if (all || it->done->load()) {
      it->thread.join();
      it = handler_threads_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace hivemind::net
