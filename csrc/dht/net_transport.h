#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "common/status.h"
#include "dht/contact.h"
#include "dht/messages.h"
#include "dht/transport.h"
#include "net/node.h"

namespace hivemind::dht {

// Method names of the DHT RPCs on a hivemind::net::Node.
inline constexpr char kPingMethod[] = "dht.v1.Ping";
inline constexpr char kStoreMethod[] = "dht.v1.Store";
inline constexpr char kFindMethod[] = "dht.v1.Find";

// Caps applied while decoding any DHT message from the network, before the node sees it.
struct WireLimits {
  size_t max_addresses = 8;
  size_t max_address_bytes = 256;
  size_t max_keys = 1024;     // keys per find request
  size_t max_items = 1024;    // items per store request
  size_t max_nearest = 64;    // contacts per find result
  size_t max_entries = 4096;  // dictionary entries per found value
  size_t max_value_bytes = size_t{64} << 10;
  size_t max_subkey_bytes = 1024;
  size_t max_raw_key_bytes = 4096;
};

// proto/dht.proto <-> messages.h. Decoders refuse anything malformed or beyond the caps with
// INVALID_ARGUMENT or RESOURCE_EXHAUSTED and a message naming the field.
std::string EncodePingRequest(const PingRequest& request);
std::string EncodePingResponse(const PingResponse& response);
std::string EncodeStoreRequest(const StoreRequest& request);
std::string EncodeStoreResponse(const StoreResponse& response);
std::string EncodeFindRequest(const FindRequest& request);
std::string EncodeFindResponse(const FindResponse& response);
Result<PingRequest> DecodePingRequest(const std::string& bytes, const WireLimits& limits);
Result<PingResponse> DecodePingResponse(const std::string& bytes, const WireLimits& limits);
Result<StoreRequest> DecodeStoreRequest(const std::string& bytes, const WireLimits& limits);
Result<StoreResponse> DecodeStoreResponse(const std::string& bytes, const WireLimits& limits);
Result<FindRequest> DecodeFindRequest(const std::string& bytes, const WireLimits& limits);
Result<FindResponse> DecodeFindResponse(const std::string& bytes, const WireLimits& limits);

struct NetTransportOptions {
  // Deadline of every DHT call (hivemind's wait_timeout).
  std::chrono::milliseconds call_timeout{3000};
  WireLimits limits;
};

// The DHT over real sockets: calls go through net::Node::Call, and Serve() registers the three
// methods on the node. The node must outlive this transport and every call it started; shut the
// node down first (it fails pending calls), then drop the DHT node.
class NetDhtTransport : public DhtTransport {
 public:
  NetDhtTransport(net::Node* node, NetTransportOptions options)
      : node_(node), options_(std::move(options)) {}

  void Ping(const Contact& to, PingRequest request, Callback<PingResponse> done) override;
  void Store(const Contact& to, StoreRequest request, Callback<StoreResponse> done) override;
  void Find(const Contact& to, FindRequest request, Callback<FindResponse> done) override;

  // Answers the DHT methods on the node with `service`, held weakly: once it is gone, calls get
  // UNAVAILABLE.
  void Serve(std::weak_ptr<DhtService> service);

  // This node as a DHT contact: its peer id and visible addresses (none in client mode).
  static Contact SelfContact(const net::Node& node);
  // A contact from a multiaddr with /p2p/<peer id> (several endpoints: separated by spaces/commas).
  static Result<Contact> ContactFromAddress(const std::string& multiaddrs);

 private:
  net::PeerAddress AddressOf(const Contact& contact) const;

  net::Node* node_;
  NetTransportOptions options_;
};

}  // namespace hivemind::dht
