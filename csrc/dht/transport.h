#pragma once

#include <functional>

#include "common/status.h"
#include "dht/contact.h"
#include "dht/messages.h"
#include "net/peer_id.h"

namespace hivemind::dht {

// How a DHT node calls other nodes. Implementations: the ZeroMQ adapter (net_transport.h) and the
// in-process simulation (sim_network.h). Every call completes exactly once, with the response or an
// error, within the transport's timeout; callbacks may run on any thread, or inline.
class DhtTransport {
 public:
  template <class T>
  using Callback = std::function<void(Result<T>)>;

  virtual ~DhtTransport() = default;
  virtual void Ping(const Contact& to, PingRequest request, Callback<PingResponse> done) = 0;
  virtual void Store(const Contact& to, StoreRequest request, Callback<StoreResponse> done) = 0;
  virtual void Find(const Contact& to, FindRequest request, Callback<FindResponse> done) = 0;
};

// The serving side: what a transport invokes when a request arrives. `from` is the caller's peer id
// as the transport authenticated it. Handlers answer at once and never block on the network.
class DhtService {
 public:
  virtual ~DhtService() = default;
  virtual Result<PingResponse> HandlePing(const net::PeerId& from, const PingRequest& request) = 0;
  virtual Result<StoreResponse> HandleStore(const net::PeerId& from,
                                            const StoreRequest& request) = 0;
  virtual Result<FindResponse> HandleFind(const net::PeerId& from, const FindRequest& request) = 0;
};

}  // namespace hivemind::dht
