#include "net/direct_hub.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sodium.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/logging.h"
#include "net/direct_io.h"

namespace hivemind::net {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kTokenBytes = 16;
// How long an offer stays valid, and how long an accepted connection may take to say hello.
constexpr auto kOfferLifetime = std::chrono::seconds(10);
constexpr auto kHelloTimeout = std::chrono::seconds(5);
constexpr size_t kMaxOffers = 4096;
// After a direct connection to a peer failed to set up, its streams go the ordinary way for this
// long (a port behind a firewall would otherwise cost connect_timeout per stream).
constexpr auto kNoDirectPeriod = std::chrono::seconds(60);
// Released receive buffers kept for reuse by all direct streams of a node. A round of 64 MiB among
// 4 peers holds about 48 MiB of received parts at once; with 32 MiB kept, every round faulted in
// ~9.6 K fresh pages per peer (~0.9 K with 128 MiB).
constexpr size_t kKeptReceiveBytes = size_t{128} << 20;
// Kept connections, per peer and in all: a round opens one stream per member and reducer, and a
// few rounds may overlap. Each costs the peer a waiting thread.
constexpr size_t kMaxIdlePerPeer = 8;
constexpr size_t kMaxIdle = 256;
// The callee keeps its end of an idle connection for 2 * direct_idle_timeout plus this, so that a
// caller (which reuses one for direct_idle_timeout only) never writes a hello into one being
// closed.
constexpr auto kCalleeKeepSlack = std::chrono::seconds(1);

Status SystemError(const std::string& what) {
  return Status(StatusCode::kInternal, what + ": " + std::strerror(errno));
}

// Codes with which a callee says it serves no direct streams (or not to us): fall back.
bool MeansNoDirect(const Status& status) {
  return status.code() == StatusCode::kNotFound || status.code() == StatusCode::kFailedPrecondition;
}

Status WriteAck(int fd, const Status& status, Clock::time_point deadline, DirectCipher* cipher) {
  wire::DirectFrame ack;
  ack.set_kind(wire::DIRECT_ACK);
  *ack.mutable_status() = ToWire(status);
  return WriteDirectFrame(fd, ack, {}, deadline, cipher);
}

// Sends `hello` on `fd` (sealed with `hello_cipher` when given) and reads the callee's ack (sealed
// with `cipher`) by `deadline`; the wait ends at once if `stream` fails meanwhile. The ack's
// status, or (`*answered` false) why there was none.
Status Handshake(DirectStream& stream, int fd, const wire::DirectFrame& hello,
                 DirectCipher* hello_cipher, DirectCipher* cipher, Clock::time_point deadline,
                 size_t max_frame_bytes, bool* answered) {
  *answered = false;
  // The socket is shut down if the stream fails while the handshake waits; only under the
  // holder's lock, so the canceller never touches a descriptor reused meanwhile.
  struct Socket {
    std::mutex mutex;
    int fd;
  };
  auto socket = std::make_shared<Socket>();
  socket->fd = fd;
  stream.SetSetupCanceller([socket] {
    std::lock_guard<std::mutex> lock(socket->mutex);
    if (socket->fd >= 0) ::shutdown(socket->fd, SHUT_RDWR);
  });
  wire::DirectFrame ack;
  Status handshake = WriteDirectFrame(fd, hello, {}, deadline, hello_cipher);
  if (handshake.ok()) {
    handshake = ReadDirectFrame(fd, max_frame_bytes, deadline, &ack, nullptr, cipher);
  }
  if (handshake.ok() && ack.kind() != wire::DIRECT_ACK) {
    handshake = Status(StatusCode::kProtocolError, "expected a direct stream ack");
  }
  {
    std::lock_guard<std::mutex> lock(socket->mutex);
    socket->fd = -1;
  }
  if (!handshake.ok()) return handshake;
  *answered = true;
  return FromWire(ack.status());
}

// What an ordinary stream would be told too; other refusals mean "go the ordinary way".
bool RefusalFailsTheStream(const Status& refused) {
  return refused.code() == StatusCode::kNotFound ||
         refused.code() == StatusCode::kResourceExhausted;
}

}  // namespace

DirectHub::DirectHub(const NodeOptions& options, Hooks hooks)
    : options_(options),
      hooks_(std::move(hooks)),
      buffers_(PayloadRecycler::Create(kKeptReceiveBytes)) {}

Result<std::unique_ptr<DirectHub>> DirectHub::Start(const NodeOptions& options,
                                                    const std::string& listen_host, Hooks hooks) {
  std::unique_ptr<DirectHub> hub(new DirectHub(options, std::move(hooks)));
  if (listen_host.empty()) return hub;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  if (::inet_pton(AF_INET, listen_host.c_str(), &address.sin_addr) != 1) {
    return Status(StatusCode::kInvalidArgument,
                  "direct streams: not an IPv4 address: " + listen_host);
  }
  hub->listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (hub->listen_fd_ < 0) return SystemError("direct streams: socket");
  int one = 1;
  ::setsockopt(hub->listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  socklen_t length = sizeof(address);
  if (::bind(hub->listen_fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::listen(hub->listen_fd_, 128) != 0 ||
      ::getsockname(hub->listen_fd_, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return SystemError("direct streams: listening on " + listen_host);
  }
  hub->port_ = ntohs(address.sin_port);
  hub->wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (hub->wake_fd_ < 0) return SystemError("direct streams: eventfd");
  DirectHub* raw = hub.get();
  hub->acceptor_ = std::thread([raw] { raw->RunAcceptor(); });
  return hub;
}

DirectHub::~DirectHub() {
  Stop();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void DirectHub::Stop() {
  std::vector<std::shared_ptr<DirectStream>> streams;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopped_) return;
    stopped_ = true;
    for (int fd : handshakes_) ::shutdown(fd, SHUT_RDWR);
    for (auto& weak : streams_) {
      if (auto stream = weak.lock()) streams.push_back(std::move(stream));
    }
    streams_.clear();
    for (auto& [peer, connections] : idle_) {
      for (const IdleConnection& connection : connections) ::close(connection.fd);
    }
    idle_.clear();
    idle_count_ = 0;
  }
  if (wake_fd_ >= 0) {
    uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof(one));
  }
  if (acceptor_.joinable()) acceptor_.join();
  // Refused from now on, like the link's port: a caller must not wait for an accept that will
  // never come.
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    listen_fd_ = -1;
  }
  // Peers see the connections end, as they see the links end: a node that shuts down is gone.
  for (auto& stream : streams) {
    stream->Fail(Status(StatusCode::kCancelled, "the node is shut down"), /*tell_peer=*/false);
  }
  threads_->JoinAll();
}

Result<Message> DirectHub::Offer(const PeerId& caller, const Message& request) {
  if (port_ == 0) {
    return Status(StatusCode::kFailedPrecondition, "this node serves no direct streams");
  }
  wire::DirectAsk ask;
  if (!ask.ParseFromString(request.header)) {
    return Status(StatusCode::kInvalidArgument, "a direct stream request that does not parse");
  }
  std::string token(kTokenBytes, '\0');
  randombytes_buf(token.data(), token.size());
  Pending pending{caller, Clock::now() + kOfferLifetime};
  if (options_.encryption) {
    pending.key = DirectCipher::NewKey();
    pending.cipher = DirectCipher::Choose(ask.aes256gcm());
  }
  wire::DirectOffer offer;
  offer.set_port(port_);
  offer.set_token(token);
  offer.set_key(pending.key);
  offer.set_cipher(pending.cipher);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // To the caller this node is going away, as its link soon will.
    if (stopped_) return Status(StatusCode::kUnavailable, "the node is shutting down");
    const auto now = Clock::now();
    for (auto it = offers_.begin(); it != offers_.end();) {
      it = it->second.expiry <= now ? offers_.erase(it) : std::next(it);
    }
    if (offers_.size() >= kMaxOffers) {
      return Status(StatusCode::kResourceExhausted, "too many direct stream offers outstanding");
    }
    offers_[token] = std::move(pending);
  }
  return Message(offer.SerializeAsString());
}

DirectConnectionStats DirectHub::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return DirectConnectionStats{dialed_, reused_, idle_count_, served_idle_};
}

DirectStream::Settings DirectHub::SettingsFor(const PeerId& peer, Milliseconds timeout,
                                              bool we_called) {
  DirectStream::Settings settings;
  settings.limits = MessageLimits{options_.max_header_bytes, options_.max_message_bytes};
  settings.window = options_.stream_window_messages;
  settings.deadline = Clock::now() + timeout;
  settings.we_called = we_called;
  settings.buffers = buffers_;
  if (options_.direct_idle_timeout.count() <= 0) return settings;
  // The hub outlives every stream thread (Stop joins them), so it outlives these too.
  DirectHub* hub = this;
  if (we_called) {
    settings.reusable = [hub, peer](int fd, std::shared_ptr<DirectCipher> cipher) {
      hub->KeepIdle(peer, fd, std::move(cipher));
    };
  } else {
    settings.reusable = [hub, peer](int fd, std::shared_ptr<DirectCipher> cipher) {
      if (!hub->threads_->Spawn([hub, fd, peer, cipher] { hub->ServeIdle(fd, peer, cipher); })) {
        ::close(fd);
      }
    };
  }
  return settings;
}

void DirectHub::KeepIdle(const PeerId& peer, int fd, std::shared_ptr<DirectCipher> cipher) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto now = Clock::now();
  // Expired connections of every peer go here (at most kMaxIdle), so that those to peers never
  // called again do not hold descriptors until Stop.
  for (auto it = idle_.begin(); it != idle_.end();) {
    auto& connections = it->second;
    connections.erase(std::remove_if(connections.begin(), connections.end(),
                                     [&](const IdleConnection& connection) {
                                       if (now - connection.since < options_.direct_idle_timeout) {
                                         return false;
                                       }
                                       ::close(connection.fd);
                                       --idle_count_;
                                       return true;
                                     }),
                      connections.end());
    it = connections.empty() ? idle_.erase(it) : std::next(it);
  }
  auto& kept = idle_[peer];
  if (stopped_ || kept.size() >= kMaxIdlePerPeer || idle_count_ >= kMaxIdle) {
    ::close(fd);  // the peer's waiting thread sees the connection end
  } else {
    kept.push_back(IdleConnection{fd, std::move(cipher), now});
    ++idle_count_;
  }
  if (kept.empty()) idle_.erase(peer);
}

std::optional<DirectHub::IdleConnection> DirectHub::TakeIdle(const PeerId& peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = idle_.find(peer);
  if (it == idle_.end()) return std::nullopt;
  std::optional<IdleConnection> taken;
  auto& kept = it->second;
  while (!kept.empty() && !taken) {
    IdleConnection connection = std::move(kept.back());
    kept.pop_back();
    --idle_count_;
    // Anything readable on an idle connection is its end (the peer closed it or died) or bytes
    // that should not be there: either way it cannot carry a stream.
    pollfd entry{connection.fd, POLLIN, 0};
    const bool fresh = Clock::now() - connection.since < options_.direct_idle_timeout;
    if (fresh && ::poll(&entry, 1, 0) == 0) {
      taken = std::move(connection);
    } else {
      ::close(connection.fd);
    }
  }
  if (kept.empty()) idle_.erase(it);
  return taken;
}

bool DirectHub::Track(const std::shared_ptr<DirectStream>& stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopped_) return false;
  streams_.erase(
      std::remove_if(streams_.begin(), streams_.end(),
                     [](const std::weak_ptr<DirectStream>& weak) { return weak.expired(); }),
      streams_.end());
  streams_.push_back(stream);
  return true;
}

bool DirectHub::DirectRefused(const PeerId& peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = no_direct_until_.find(peer);
  if (it == no_direct_until_.end()) return false;
  if (Clock::now() < it->second) return true;
  no_direct_until_.erase(it);
  return false;
}

void DirectHub::RefuseDirect(const PeerId& peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  no_direct_until_[peer] = Clock::now() + kNoDirectPeriod;
}

void DirectHub::RunAcceptor() {
  while (true) {
    pollfd entries[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    int ready = ::poll(entries, 2, -1);
    if (ready < 0 && errno != EINTR) {
      HM_LOG(kError) << "direct streams: poll failed: " << std::strerror(errno);
      return;
    }
    if (entries[1].revents != 0) return;  // Stop
    if (ready <= 0 || entries[0].revents == 0) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) continue;  // the caller gave up already, or out of descriptors for a moment
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopped_) {
        ::close(fd);
        return;
      }
      handshakes_.insert(fd);
    }
    if (!threads_->Spawn([this, fd] { Serve(fd); })) {
      std::lock_guard<std::mutex> lock(mutex_);
      handshakes_.erase(fd);
      ::close(fd);
    }
  }
}

void DirectHub::Serve(int fd) {
  wire::DirectFrame hello;
  Status read = ReadDirectFrame(fd, MaxDirectFrameBytes(options_.max_header_bytes),
                                Clock::now() + kHelloTimeout, &hello);
  Pending offered;
  if (read.ok() && hello.kind() == wire::DIRECT_HELLO) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto offer = offers_.find(hello.token());
    if (offer != offers_.end()) {
      if (offer->second.expiry > Clock::now()) offered = std::move(offer->second);
      offers_.erase(offer);  // single use, whatever happens next
    }
  }
  if (!read.ok() || hello.kind() != wire::DIRECT_HELLO || offered.peer == PeerId()) {
    // In the clear even with encryption: whoever holds no valid token holds no key either. Not
    // our protocol, or a caller that went away: nobody to tell.
    if (read.ok() && hello.kind() == wire::DIRECT_HELLO) {
      (void)WriteAck(
          fd, Status(StatusCode::kPermissionDenied, "unknown or expired direct stream token"),
          Clock::now() + kHelloTimeout, nullptr);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    handshakes_.erase(fd);
    ::close(fd);
    return;
  }
  std::shared_ptr<DirectCipher> cipher;
  if (offered.cipher != wire::DIRECT_PLAIN) {
    cipher = std::make_shared<DirectCipher>(offered.cipher, offered.key, /*caller=*/false);
  }
  ServeStream(fd, offered.peer, std::move(cipher), hello);
}

void DirectHub::ServeIdle(int fd, PeerId peer, std::shared_ptr<DirectCipher> cipher) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopped_) {
      ::close(fd);
      return;
    }
    handshakes_.insert(fd);  // Stop ends the wait
    ++served_idle_;
  }
  // The next hello is sealed like the stream's records were: only the caller can write it. It
  // names no token: the connection is already the caller's.
  wire::DirectFrame hello;
  Status read = ReadDirectFrame(fd, MaxDirectFrameBytes(options_.max_header_bytes),
                                Clock::now() + 2 * options_.direct_idle_timeout + kCalleeKeepSlack,
                                &hello, nullptr, cipher.get());
  const bool next = read.ok() && hello.kind() == wire::DIRECT_HELLO && hello.token().empty();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    --served_idle_;
    if (!next || stopped_) {
      // The caller closed it, went quiet for too long, or broke the protocol.
      handshakes_.erase(fd);
      ::close(fd);
      return;
    }
  }
  ServeStream(fd, peer, std::move(cipher), hello);
}

void DirectHub::ServeStream(int fd, const PeerId& peer, std::shared_ptr<DirectCipher> cipher,
                            const wire::DirectFrame& hello) {
  auto refuse = [&](const Status& why) {
    (void)WriteAck(fd, why, Clock::now() + kHelloTimeout, cipher.get());
    std::lock_guard<std::mutex> lock(mutex_);
    handshakes_.erase(fd);
    ::close(fd);
  };
  StreamHandler handler = hooks_.handler_for(hello.method());
  if (!handler) {
    return refuse(Status(StatusCode::kNotFound, "no stream method '" + hello.method() + "' here"));
  }
  bool too_many;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    int& served = served_per_peer_[peer];
    too_many = served >= options_.max_inbound_streams_per_peer;
    if (!too_many) ++served;
  }
  if (too_many) {
    return refuse(Status(StatusCode::kResourceExhausted,
                         "more than " + std::to_string(options_.max_inbound_streams_per_peer) +
                             " streams from one peer open at once"));
  }
  auto timeout =
      hello.timeout_ms() > 0 ? Milliseconds(hello.timeout_ms()) : options_.default_call_timeout;
  const DirectStream::Settings settings = SettingsFor(peer, timeout, /*we_called=*/false);
  auto stream = std::make_shared<DirectStream>(peer, settings, threads_);
  Status acked = WriteAck(fd, Status::Ok(),
                          std::min(settings.deadline, Clock::now() + kHelloTimeout), cipher.get());
  bool started = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    handshakes_.erase(fd);
  }
  if (acked.ok() && Track(stream)) {
    started = stream->Start(fd, cipher);  // owns fd from here on
  } else {
    ::close(fd);
  }
  if (started) {
    CallContext context{peer, hello.method(), settings.deadline, stream->cancelled()};
    Status result;
    try {
      result = handler(context, *stream);
    } catch (const std::exception& error) {
      result = Status(StatusCode::kInternal,
                      "the handler of '" + hello.method() + "' threw: " + error.what());
    } catch (...) {
      result = Status(StatusCode::kInternal, "the handler of '" + hello.method() + "' threw");
    }
    stream->FinishFromHandler(result);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (--served_per_peer_[peer] <= 0) served_per_peer_.erase(peer);
}

std::shared_ptr<Stream> DirectHub::Open(const PeerAddress& peer, const std::string& method,
                                        Milliseconds timeout) {
  if (DirectRefused(peer.peer_id)) {
    return hooks_.open_ordinary(peer, method, CallOptions{timeout});
  }
  auto stream = std::make_shared<DirectStream>(
      peer.peer_id, SettingsFor(peer.peer_id, timeout, /*we_called=*/true), threads_);
  if (!Track(stream) || !threads_->Spawn([this, stream, peer, method, timeout] {
        Dial(stream, peer, method, timeout);
      })) {
    stream->Fail(Status(StatusCode::kCancelled, "the node is shut down"));
  }
  return stream;
}

void DirectHub::Dial(const std::shared_ptr<DirectStream>& stream, const PeerAddress& peer,
                     const std::string& method, Milliseconds timeout) {
  const auto deadline = stream->deadline();
  auto left = [&] {
    return std::max(Milliseconds(1),
                    std::chrono::duration_cast<Milliseconds>(deadline - Clock::now()));
  };
  // Whatever cannot go direct goes the ordinary way, with the time left.
  auto divert = [&](bool remember) {
    if (remember) RefuseDirect(peer.peer_id);
    stream->Divert(hooks_.open_ordinary(peer, method, CallOptions{left()}));
  };
  // The callee refused a stream it was asked for: as an ordinary stream would be, or diverted.
  auto refused_by_callee = [&](const Status& refused) {
    if (stream->cancelled()->load()) return;  // failed meanwhile: nothing to set up
    if (RefusalFailsTheStream(refused)) {
      stream->Fail(refused.WithContext("stream on peer " + peer.peer_id.ToString()));
      return;
    }
    divert(true);
  };
  const size_t max_frame = MaxDirectFrameBytes(options_.max_header_bytes);
  wire::DirectFrame hello;
  hello.set_kind(wire::DIRECT_HELLO);
  hello.set_method(method);

  // A connection kept from an earlier stream: one round trip. If it turns out dead (the peer
  // closed it or restarted), a fresh one is dialed below.
  if (auto kept = TakeIdle(peer.peer_id)) {
    hello.set_timeout_ms(static_cast<uint32_t>(left().count()));
    const auto setup_deadline = std::min(deadline, Clock::now() + options_.connect_timeout);
    bool answered = false;
    Status refused = Handshake(*stream, kept->fd, hello, kept->cipher.get(), kept->cipher.get(),
                               setup_deadline, max_frame, &answered);
    if (refused.ok()) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ++reused_;
      }
      stream->Start(kept->fd, kept->cipher);  // owns the descriptor from here on
      return;
    }
    ::close(kept->fd);
    if (answered) return refused_by_callee(refused);
    if (stream->cancelled()->load()) return;
  }

  const Endpoint* endpoint = nullptr;
  for (const Endpoint& candidate : peer.endpoints) {
    if (candidate.kind != Endpoint::Kind::kDns) {
      endpoint = &candidate;
      break;
    }
  }
  if (endpoint == nullptr) return divert(false);  // reached through an existing link only

  wire::DirectAsk ask;
  ask.set_aes256gcm(DirectCipher::AesAvailable());
  Future<Message> asked =
      hooks_.call(peer, kDirectOfferMethod, Message(ask.SerializeAsString()), CallOptions{timeout});
  stream->SetSetupCanceller([asked] { asked.Cancel(); });
  const Result<Message>& answer = asked.Wait();
  if (!answer.ok()) {
    if (MeansNoDirect(answer.status())) return divert(true);
    // The peer is unreachable or the stream was cancelled: an ordinary stream would fail too.
    stream->Fail(answer.status());
    return;
  }
  wire::DirectOffer offer;
  if (!offer.ParseFromString(answer->header) || offer.port() == 0 || offer.port() > 65535) {
    return divert(true);
  }
  // Never in the clear when this node encrypts, nor with a cipher this CPU cannot run.
  std::shared_ptr<DirectCipher> cipher;
  if (options_.encryption) {
    const bool runnable =
        offer.cipher() == wire::DIRECT_CHACHA20POLY1305 ||
        (offer.cipher() == wire::DIRECT_AES256GCM && DirectCipher::AesAvailable());
    if (!runnable || offer.key().size() != DirectCipher::kKeyBytes) return divert(true);
    cipher = std::make_shared<DirectCipher>(offer.cipher(), offer.key(), /*caller=*/true);
  } else if (offer.cipher() != wire::DIRECT_PLAIN) {
    return divert(true);
  }
  const auto setup_deadline = std::min(deadline, Clock::now() + options_.connect_timeout);
  auto connected =
      ConnectDirect(endpoint->host, static_cast<uint16_t>(offer.port()), setup_deadline);
  if (!connected.ok()) return divert(true);
  const int fd = *connected;
  // The first hello travels in the clear: its token is what ties the connection to the offer.
  hello.set_token(offer.token());
  hello.set_timeout_ms(static_cast<uint32_t>(left().count()));
  bool answered = false;
  Status refused =
      Handshake(*stream, fd, hello, nullptr, cipher.get(), setup_deadline, max_frame, &answered);
  if (refused.ok()) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++dialed_;
    }
    stream->Start(fd, cipher);  // owns fd from here on
    return;
  }
  ::close(fd);
  if (answered) return refused_by_callee(refused);
  if (stream->cancelled()->load()) return;
  divert(true);
}

}  // namespace hivemind::net
