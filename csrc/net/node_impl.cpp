#include "net/node_impl.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sodium.h>

#include <algorithm>
#include <cstring>

#include "common/logging.h"

#ifndef ZMQ_ZAP_ENFORCE_DOMAIN
#define ZMQ_ZAP_ENFORCE_DOMAIN 93  // stable in libzmq 4.3, but Debian's header hides it as draft
#endif

namespace hivemind::net {
namespace {

using Clock = std::chrono::steady_clock;
constexpr char kZapDomain[] = "hivemind";
constexpr auto kSweepInterval = std::chrono::milliseconds(20);

// Addresses of this machine's interfaces, for a node listening on 0.0.0.0.
std::vector<std::string> LocalIp4Addresses() {
  std::vector<std::string> addresses;
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return {"127.0.0.1"};
  for (ifaddrs* entry = list; entry != nullptr; entry = entry->ifa_next) {
    if (entry->ifa_addr == nullptr || entry->ifa_addr->sa_family != AF_INET) continue;
    char text[INET_ADDRSTRLEN];
    auto* address = reinterpret_cast<sockaddr_in*>(entry->ifa_addr);
    if (inet_ntop(AF_INET, &address->sin_addr, text, sizeof(text)) != nullptr) {
      addresses.emplace_back(text);
    }
  }
  freeifaddrs(list);
  if (addresses.empty()) addresses.emplace_back("127.0.0.1");
  return addresses;
}

Status ValidateOptions(const NodeOptions& options) {
  auto bad = [](const std::string& why) { return Status(StatusCode::kInvalidArgument, why); };
  if (options.chunk_bytes < 4096 || options.chunk_bytes > kMaxChunkBytes) {
    return bad("chunk_bytes must be between 4 KiB and 16 MiB");
  }
  if (options.link_window_chunks < 1) return bad("link_window_chunks must be at least 1");
  if (options.stream_window_messages < 1) return bad("stream_window_messages must be at least 1");
  if (options.max_inbound_streams_per_peer < 1 || options.max_inflight_requests_per_peer < 1) {
    return bad("per-peer limits must be at least 1");
  }
  if (options.default_call_timeout.count() <= 0 || options.connect_timeout.count() <= 0 ||
      options.heartbeat_interval.count() <= 0 ||
      options.heartbeat_timeout < options.heartbeat_interval) {
    return bad("timeouts must be positive and heartbeat_timeout >= heartbeat_interval");
  }
  if (options.max_header_bytes == 0 || options.max_message_bytes < options.max_header_bytes) {
    return bad("max_message_bytes must be at least max_header_bytes");
  }
  if (options.worker_threads < 1) return bad("worker_threads must be at least 1");
  return Status::Ok();
}

}  // namespace

void ApplyConnectionOptions(zmq::socket_t& socket, const NodeOptions& options) {
  socket.set(zmq::sockopt::linger, 0);
  // One ZeroMQ message holds at most one chunk and a header; anything larger is not our protocol.
  socket.set(zmq::sockopt::maxmsgsize,
             static_cast<int64_t>(kMaxChunkBytes + options.max_header_bytes + (64 << 10)));
  socket.set(zmq::sockopt::heartbeat_ivl, static_cast<int>(options.heartbeat_interval.count()));
  socket.set(zmq::sockopt::heartbeat_timeout, static_cast<int>(options.heartbeat_timeout.count()));
  socket.set(zmq::sockopt::heartbeat_ttl, static_cast<int>(options.heartbeat_timeout.count()));
}

Result<std::unique_ptr<Node>> Node::Start(NodeOptions options) {
  Status valid = ValidateOptions(options);
  if (!valid.ok()) return valid;
  Identity identity = options.identity ? *options.identity : Identity::Generate();
  auto node = std::make_unique<NodeImpl>(std::move(options), std::move(identity));
  Status opened = node->Open();
  if (!opened.ok()) return opened;
  return std::unique_ptr<Node>(std::move(node));
}

NodeImpl::NodeImpl(NodeOptions options, Identity identity)
    : options_(std::move(options)),
      limits_{options_.max_header_bytes, options_.max_message_bytes},
      identity_(std::move(identity)),
      pool_(std::make_shared<WorkerPool>(options_.worker_threads)),
      context_(1) {
  context_.set(zmq::ctxopt::blocky, false);
  visible_.peer_id = identity_.peer_id();
}

NodeImpl::~NodeImpl() { Shutdown(); }

Status NodeImpl::Open() {
  try {
    if (!options_.client_mode) {
      if (options_.encryption) {
        // The ZAP handler must exist before the ROUTER accepts anyone; without it CURVE
        // would encrypt but authenticate nobody.
        zap_ = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::rep);
        zap_->set(zmq::sockopt::linger, 0);
        zap_->bind("inproc://zeromq.zap.01");
      }
      router_ = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::router);
      ApplyConnectionOptions(*router_, options_);
      router_->set(zmq::sockopt::router_mandatory, 1);
      if (options_.encryption) {
        router_->set(zmq::sockopt::curve_server, 1);
        router_->set(zmq::sockopt::curve_secretkey,
                     zmq::const_buffer(identity_.curve_secret_key().data(), 32));
        router_->set(zmq::sockopt::zap_domain, kZapDomain);
        int enforce = 1;
        zmq_setsockopt(router_->handle(), ZMQ_ZAP_ENFORCE_DOMAIN, &enforce, sizeof(enforce));
      }
      if (zmq_socket_monitor(router_->handle(), "inproc://hivemind-router-monitor",
                             ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED) != 0) {
        throw zmq::error_t();
      }
      router_monitor_ = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::pair);
      router_monitor_->connect("inproc://hivemind-router-monitor");

      std::vector<Endpoint> bound;
      for (const auto& text : options_.listen_addresses) {
        auto endpoint = Endpoint::Parse(text);
        if (!endpoint.ok()) return endpoint.status().WithContext("listen address");
        try {
          router_->bind(endpoint->ZmqEndpoint());
        } catch (const zmq::error_t& error) {
          return Status(StatusCode::kInvalidArgument,
                        "cannot listen on " + text + ": " + error.what());
        }
        // Learn the port the system picked for port 0.
        std::string last = router_->get(zmq::sockopt::last_endpoint);
        auto colon = last.rfind(':');
        endpoint->port = static_cast<uint16_t>(std::stoi(last.substr(colon + 1)));
        if (endpoint->host == "0.0.0.0") {
          for (const auto& ip : LocalIp4Addresses()) {
            bound.push_back(Endpoint{Endpoint::Kind::kIp4, ip, endpoint->port});
          }
        } else {
          bound.push_back(*endpoint);
        }
      }
      visible_.endpoints = bound;
      if (!options_.announce_addresses.empty()) {
        visible_.endpoints.clear();
        for (const auto& text : options_.announce_addresses) {
          auto endpoint = Endpoint::Parse(text);
          if (!endpoint.ok()) return endpoint.status().WithContext("announce address");
          visible_.endpoints.push_back(*endpoint);
        }
      }
    }
  } catch (const zmq::error_t& error) {
    return Status(StatusCode::kInternal, std::string("ZeroMQ setup failed: ") + error.what());
  }
  next_sweep_ = Clock::now() + kSweepInterval;
  reactor_thread_ = std::thread([this] { RunReactor(); });
  return StartDirectStreams();
}

Status NodeImpl::StartDirectStreams() {
  if (!options_.direct_streams) return Status::Ok();
  // Served on the first IPv4 listen address (0.0.0.0 included), at a port of its own.
  std::string host;
  if (!options_.client_mode && !options_.listen_addresses.empty()) {
    auto endpoint = Endpoint::Parse(options_.listen_addresses.front());
    if (endpoint.ok() && endpoint->kind == Endpoint::Kind::kIp4) host = endpoint->host;
  }
  DirectHub::Hooks hooks;
  hooks.handler_for = [this](const std::string& method) {
    std::lock_guard<std::mutex> lock(handlers_mutex_);
    auto it = stream_handlers_.find(method);
    return it == stream_handlers_.end() ? StreamHandler() : it->second;
  };
  hooks.call = [this](const PeerAddress& peer, const std::string& method, Message request,
                      CallOptions options) {
    return Call(peer, method, std::move(request), options);
  };
  hooks.open_ordinary = [this](const PeerAddress& peer, const std::string& method,
                               CallOptions options) {
    options.direct = false;
    return OpenStream(peer, method, options);
  };
  auto hub = DirectHub::Start(options_, host, std::move(hooks));
  if (!hub.ok()) {
    Shutdown();
    return hub.status();
  }
  direct_ = std::move(hub).value();
  RegisterUnary(kDirectOfferMethod,
                [this](const CallContext& context, Message request, Responder respond) {
                  respond(direct_->Offer(context.peer, request));
                });
  return Status::Ok();
}

void NodeImpl::RegisterUnary(const std::string& method, UnaryHandler handler) {
  std::lock_guard<std::mutex> lock(handlers_mutex_);
  unary_handlers_[method] = std::move(handler);
}

void NodeImpl::RegisterStream(const std::string& method, StreamHandler handler) {
  std::lock_guard<std::mutex> lock(handlers_mutex_);
  stream_handlers_[method] = std::move(handler);
}

DirectConnectionStats NodeImpl::direct_connections() const {
  return direct_ ? direct_->stats() : DirectConnectionStats{};
}

std::vector<PeerId> NodeImpl::ConnectedPeers() const {
  std::lock_guard<std::mutex> lock(peers_mutex_);
  return connected_peers_;
}

Milliseconds NodeImpl::TimeoutFor(const CallOptions& options) const {
  return options.timeout.count() > 0 ? options.timeout : options_.default_call_timeout;
}

NodeImpl::TimePoint NodeImpl::DeadlineFor(const CallOptions& options) const {
  return Clock::now() + TimeoutFor(options);
}

Future<Message> NodeImpl::Call(const PeerAddress& peer, const std::string& method, Message request,
                               CallOptions options) {
  Status size = limits_.Check(request);
  if (!size.ok()) return Future<Message>::Ready(size);
  Promise<Message> promise;
  uint64_t call_id = next_call_id_++;
  auto shared = std::make_shared<Message>(std::move(request));
  bool posted = commands_->Post([this, call_id, peer, method, shared, promise,
                                 deadline = DeadlineFor(options), timeout = TimeoutFor(options)] {
    StartCall(call_id, peer, method, std::move(*shared), deadline, timeout, promise);
  });
  if (!posted)
    return Future<Message>::Ready(Status(StatusCode::kCancelled, "the node is shut down"));
  promise.SetCanceller([this, call_id, queue = commands_] {
    queue->Post([this, call_id] {
      auto it = out_calls_.find(call_id);
      if (it == out_calls_.end()) return;
      if (Link* link = FindLink(it->second.link_id)) {
        wire::Envelope cancel;
        cancel.set_kind(wire::CANCEL);
        cancel.set_call_id(call_id);
        cancel.set_from_caller(true);
        // Behind the request in the call's queue, so the callee sees the request first.
        Enqueue(*link, cancel, {});
      }
      CompleteOutCall(call_id, Status(StatusCode::kCancelled, "the call was cancelled"));
    });
  });
  return promise.future();
}

std::shared_ptr<Stream> NodeImpl::OpenStream(const PeerAddress& peer, const std::string& method,
                                             CallOptions options) {
  if (options.direct && direct_) return direct_->Open(peer, method, TimeoutFor(options));
  uint64_t call_id = next_call_id_++;
  // The link id is filled in by the reactor; until then the stream only queues.
  auto stream =
      std::make_shared<StreamImpl>(peer.peer_id, 0, call_id, true, options_.stream_window_messages,
                                   commands_, pool_, this, limits_);
  bool posted = commands_->Post(
      [this, stream, peer, method, deadline = DeadlineFor(options), timeout = TimeoutFor(options)] {
        StartStream(stream, peer, method, deadline, timeout);
      });
  if (!posted) stream->Fail(Status(StatusCode::kCancelled, "the node is shut down"));
  return stream;
}

void NodeImpl::Shutdown() {
  std::lock_guard<std::mutex> lock(shutdown_mutex_);
  if (shut_down_.exchange(true)) return;
  if (reactor_thread_.joinable()) {
    if (!commands_->Post([this] { stopping_ = true; })) stopping_ = true;
    reactor_thread_.join();
  }
  commands_->Close();
  // Only now, with the links gone: a round that sees its direct streams fail can no longer tell
  // anyone (it would report live peers failed). Calls its dialers wait for have failed already.
  if (direct_) direct_->Stop();
  ReapHandlerThreads(true);
  pool_->Shutdown();
}

}  // namespace hivemind::net
