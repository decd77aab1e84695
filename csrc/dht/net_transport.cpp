#include "dht/net_transport.h"

#include <cmath>

#include "proto/dht.pb.h"

namespace hivemind::dht {

namespace {

namespace wire = ::hivemind::dht::wire;

Status Malformed(const std::string& what) { return Status(StatusCode::kInvalidArgument, what); }

Status TooMany(const std::string& what, size_t count, size_t cap) {
  return Status(
      StatusCode::kResourceExhausted,
      what + ": " + std::to_string(count) + ", more than the cap of " + std::to_string(cap));
}

// ---- encoding ----

void ToWire(const SenderInfo& sender, wire::SenderInfo* out) {
  out->set_is_server(sender.is_server);
  for (const auto& address : sender.addresses) out->add_addresses(address);
}

void ToWire(const TimedValue& value, wire::TimedValue* out) {
  out->set_value(value.value);
  out->set_expiration_time(value.expiration);
}

void ToWire(const DhtValue& value, wire::FoundValue* out) {
  if (value.regular()) ToWire(*value.regular(), out->mutable_regular());
  for (const auto& [subkey, entry] : value.dictionary()) {
    auto* wire_entry = out->add_entries();
    wire_entry->set_subkey(subkey);
    ToWire(entry, wire_entry->mutable_value());
  }
}

// ---- decoding ----

Status CheckAddresses(const google::protobuf::RepeatedPtrField<std::string>& addresses,
                      const WireLimits& limits, const std::string& where) {
  if (static_cast<size_t>(addresses.size()) > limits.max_addresses) {
    return TooMany(where + " addresses", addresses.size(), limits.max_addresses);
  }
  for (const auto& address : addresses) {
    if (address.size() > limits.max_address_bytes) {
      return TooMany(where + " address bytes", address.size(), limits.max_address_bytes);
    }
  }
  return Status::Ok();
}

Result<SenderInfo> FromWire(const wire::SenderInfo& sender, const WireLimits& limits) {
  Status ok = CheckAddresses(sender.addresses(), limits, "sender");
  if (!ok.ok()) return ok;
  SenderInfo out;
  out.is_server = sender.is_server();
  if (out.is_server) out.addresses.assign(sender.addresses().begin(), sender.addresses().end());
  return out;
}

Result<TimedValue> FromWire(const wire::TimedValue& value, const WireLimits& limits,
                            const std::string& where) {
  if (!std::isfinite(value.expiration_time())) {
    return Malformed(where + ": expiration time is not a finite number");
  }
  if (value.value().size() > limits.max_value_bytes) {
    return TooMany(where + ": value bytes", value.value().size(), limits.max_value_bytes);
  }
  return TimedValue{value.value(), value.expiration_time()};
}

Result<DhtId> KeyFromWire(const std::string& bytes, const std::string& where) {
  auto id = DhtId::FromBytes(bytes);
  if (!id.ok()) return Malformed(where + ": " + id.status().message());
  return id;
}

Result<DhtValue> FromWire(const wire::FoundValue& found, const WireLimits& limits,
                          const std::string& where) {
  if (static_cast<size_t>(found.entries_size()) > limits.max_entries) {
    return TooMany(where + ": dictionary entries", found.entries_size(), limits.max_entries);
  }
  DhtValue value;
  if (found.has_regular()) {
    auto regular = FromWire(found.regular(), limits, where);
    if (!regular.ok()) return regular.status();
    value.StoreRegular(*regular);
  }
  for (const auto& entry : found.entries()) {
    if (entry.subkey().size() > limits.max_subkey_bytes) {
      return TooMany(where + ": subkey bytes", entry.subkey().size(), limits.max_subkey_bytes);
    }
    auto timed = FromWire(entry.value(), limits, where);
    if (!timed.ok()) return timed.status();
    value.StoreSubkey(entry.subkey(), *timed);
  }
  return value;
}

template <class Proto>
Status Parse(Proto& proto, const std::string& bytes, const char* name) {
  if (!proto.ParseFromString(bytes)) {
    return Malformed(std::string("malformed ") + name + ": not a valid protobuf message");
  }
  return Status::Ok();
}

}  // namespace

std::string EncodePingRequest(const PingRequest& request) {
  wire::PingRequest proto;
  ToWire(request.sender, proto.mutable_sender());
  return proto.SerializeAsString();
}

std::string EncodePingResponse(const PingResponse& response) {
  wire::PingResponse proto;
  proto.set_dht_time(response.dht_time);
  proto.set_is_server(response.is_server);
  return proto.SerializeAsString();
}

std::string EncodeStoreRequest(const StoreRequest& request) {
  wire::StoreRequest proto;
  ToWire(request.sender, proto.mutable_sender());
  for (const auto& item : request.items) {
    auto* out = proto.add_items();
    out->set_key_id(std::string(item.key.raw()));
    if (item.raw_key) out->set_raw_key(*item.raw_key);
    if (item.subkey) out->set_subkey(*item.subkey);
    ToWire(item.value, out->mutable_value());
    out->set_in_cache(item.in_cache);
  }
  return proto.SerializeAsString();
}

std::string EncodeStoreResponse(const StoreResponse& response) {
  wire::StoreResponse proto;
  for (const auto& error : response.errors) proto.add_errors(error);
  return proto.SerializeAsString();
}

std::string EncodeFindRequest(const FindRequest& request) {
  wire::FindRequest proto;
  ToWire(request.sender, proto.mutable_sender());
  for (const auto& key : request.keys) proto.add_key_ids(std::string(key.raw()));
  return proto.SerializeAsString();
}

std::string EncodeFindResponse(const FindResponse& response) {
  wire::FindResponse proto;
  for (const auto& result : response.results) {
    auto* out = proto.add_results();
    if (result.value) ToWire(*result.value, out->mutable_value());
    for (const auto& contact : result.nearest) {
      auto* node = out->add_nearest();
      node->set_peer_id(std::string(contact.peer_id.raw()));
      for (const auto& address : contact.addresses) node->add_addresses(address);
    }
  }
  return proto.SerializeAsString();
}

Result<PingRequest> DecodePingRequest(const std::string& bytes, const WireLimits& limits) {
  wire::PingRequest proto;
  Status parsed = Parse(proto, bytes, "dht PingRequest");
  if (!parsed.ok()) return parsed;
  auto sender = FromWire(proto.sender(), limits);
  if (!sender.ok()) return sender.status();
  return PingRequest{std::move(sender).value()};
}

Result<PingResponse> DecodePingResponse(const std::string& bytes, const WireLimits&) {
  wire::PingResponse proto;
  Status parsed = Parse(proto, bytes, "dht PingResponse");
  if (!parsed.ok()) return parsed;
  if (!std::isfinite(proto.dht_time())) return Malformed("dht PingResponse: time is not finite");
  return PingResponse{proto.dht_time(), proto.is_server()};
}

Result<StoreRequest> DecodeStoreRequest(const std::string& bytes, const WireLimits& limits) {
  wire::StoreRequest proto;
  Status parsed = Parse(proto, bytes, "dht StoreRequest");
  if (!parsed.ok()) return parsed;
  if (proto.items_size() == 0) return Malformed("dht StoreRequest has no items");
  if (static_cast<size_t>(proto.items_size()) > limits.max_items) {
    return TooMany("dht StoreRequest items", proto.items_size(), limits.max_items);
  }
  StoreRequest request;
  auto sender = FromWire(proto.sender(), limits);
  if (!sender.ok()) return sender.status();
  request.sender = std::move(sender).value();
  for (int i = 0; i < proto.items_size(); ++i) {
    const auto& item = proto.items(i);
    const std::string where = "dht StoreRequest item " + std::to_string(i);
    auto key = KeyFromWire(item.key_id(), where);
    if (!key.ok()) return key.status();
    if (!item.has_value()) return Malformed(where + " has no value");
    auto value = FromWire(item.value(), limits, where);
    if (!value.ok()) return value.status();
    StoreItem out;
    out.key = *key;
    out.value = std::move(value).value();
    out.in_cache = item.in_cache();
    if (item.has_subkey()) {
      if (item.subkey().size() > limits.max_subkey_bytes) {
        return TooMany(where + ": subkey bytes", item.subkey().size(), limits.max_subkey_bytes);
      }
      out.subkey = item.subkey();
    }
    if (item.has_raw_key()) {
      if (item.raw_key().size() > limits.max_raw_key_bytes) {
        return TooMany(where + ": raw key bytes", item.raw_key().size(), limits.max_raw_key_bytes);
      }
      if (DhtId::OfKey(item.raw_key()) != out.key) {
        return Malformed(where + ": raw key does not hash to the key id");
      }
      out.raw_key = item.raw_key();
    }
    request.items.push_back(std::move(out));
  }
  return request;
}

Result<StoreResponse> DecodeStoreResponse(const std::string& bytes, const WireLimits& limits) {
  wire::StoreResponse proto;
  Status parsed = Parse(proto, bytes, "dht StoreResponse");
  if (!parsed.ok()) return parsed;
  if (static_cast<size_t>(proto.errors_size()) > limits.max_items) {
    return TooMany("dht StoreResponse errors", proto.errors_size(), limits.max_items);
  }
  return StoreResponse{{proto.errors().begin(), proto.errors().end()}};
}

Result<FindRequest> DecodeFindRequest(const std::string& bytes, const WireLimits& limits) {
  wire::FindRequest proto;
  Status parsed = Parse(proto, bytes, "dht FindRequest");
  if (!parsed.ok()) return parsed;
  if (proto.key_ids_size() == 0) return Malformed("dht FindRequest has no keys");
  if (static_cast<size_t>(proto.key_ids_size()) > limits.max_keys) {
    return TooMany("dht FindRequest keys", proto.key_ids_size(), limits.max_keys);
  }
  FindRequest request;
  auto sender = FromWire(proto.sender(), limits);
  if (!sender.ok()) return sender.status();
  request.sender = std::move(sender).value();
  for (int i = 0; i < proto.key_ids_size(); ++i) {
    auto key = KeyFromWire(proto.key_ids(i), "dht FindRequest key " + std::to_string(i));
    if (!key.ok()) return key.status();
    request.keys.push_back(*key);
  }
  return request;
}

Result<FindResponse> DecodeFindResponse(const std::string& bytes, const WireLimits& limits) {
  wire::FindResponse proto;
  Status parsed = Parse(proto, bytes, "dht FindResponse");
  if (!parsed.ok()) return parsed;
  if (static_cast<size_t>(proto.results_size()) > limits.max_keys) {
    return TooMany("dht FindResponse results", proto.results_size(), limits.max_keys);
  }
  FindResponse response;
  for (int i = 0; i < proto.results_size(); ++i) {
    const auto& result = proto.results(i);
    const std::string where = "dht FindResponse result " + std::to_string(i);
    FindResult out;
    if (result.has_value()) {
      auto value = FromWire(result.value(), limits, where);
      if (!value.ok()) return value.status();
      out.value = std::move(value).value();
    }
    if (static_cast<size_t>(result.nearest_size()) > limits.max_nearest) {
      return TooMany(where + " nearest nodes", result.nearest_size(), limits.max_nearest);
    }
    for (const auto& node : result.nearest()) {
      auto peer = net::PeerId::FromBytes(node.peer_id());
      if (!peer.ok()) return Malformed(where + ": " + peer.status().message());
      Status addresses = CheckAddresses(node.addresses(), limits, where + " node");
      if (!addresses.ok()) return addresses;
      out.nearest.emplace_back(
          *peer, std::vector<std::string>(node.addresses().begin(), node.addresses().end()));
    }
    response.results.push_back(std::move(out));
  }
  return response;
}

// ---- transport ----

net::PeerAddress NetDhtTransport::AddressOf(const Contact& contact) const {
  net::PeerAddress address;
  address.peer_id = contact.peer_id;
  for (const auto& text : contact.addresses) {
    auto endpoint = net::Endpoint::Parse(text);
    if (endpoint.ok()) address.endpoints.push_back(*endpoint);
  }
  return address;
}

namespace {

// One unary call: encode, send, decode the answer, hand it to `done`.
template <class Response, class Decoder>
void CallPeer(net::Node* node, const net::PeerAddress& address, const char* method,
              std::string header, std::chrono::milliseconds timeout, WireLimits limits,
              Decoder decode, DhtTransport::Callback<Response> done) {
  net::CallOptions options;
  options.timeout = timeout;
  node->Call(address, method, net::Message(std::move(header)), options)
      .OnReady([decode, limits, done = std::move(done)](const Result<net::Message>& reply) {
        if (!reply.ok()) {
          done(reply.status());
          return;
        }
        auto decoded = decode(reply->header, limits);
        if (!decoded.ok()) {
          done(Status(StatusCode::kProtocolError, decoded.status().ToString()));
          return;
        }
        done(std::move(decoded));
      });
}

// Registers one method: decode the request, let the service answer, encode the response.
template <class Request, class Decoder, class Handler, class Encoder>
void ServeMethod(net::Node* node, const char* method, std::weak_ptr<DhtService> weak,
                 WireLimits limits, Decoder decode, Handler handle, Encoder encode) {
  node->RegisterUnary(
      method, [=](const net::CallContext& context, net::Message request, net::Responder respond) {
        auto service = weak.lock();
        if (!service) {
          respond(Status(StatusCode::kUnavailable, "the DHT node has shut down"));
          return;
        }
        if (!request.payloads.empty()) {
          respond(Status(StatusCode::kInvalidArgument,
                         std::string(method) + " takes no payload frames"));
          return;
        }
        auto decoded = decode(request.header, limits);
        if (!decoded.ok()) {
          respond(decoded.status());
          return;
        }
        auto result = handle(*service, context.peer, *decoded);
        if (!result.ok()) {
          respond(result.status());
          return;
        }
        respond(net::Message(encode(*result)));
      });
}

}  // namespace

void NetDhtTransport::Ping(const Contact& to, PingRequest request, Callback<PingResponse> done) {
  CallPeer<PingResponse>(node_, AddressOf(to), kPingMethod, EncodePingRequest(request),
                         options_.call_timeout, options_.limits, DecodePingResponse,
                         std::move(done));
}

void NetDhtTransport::Store(const Contact& to, StoreRequest request, Callback<StoreResponse> done) {
  CallPeer<StoreResponse>(node_, AddressOf(to), kStoreMethod, EncodeStoreRequest(request),
                          options_.call_timeout, options_.limits, DecodeStoreResponse,
                          std::move(done));
}

void NetDhtTransport::Find(const Contact& to, FindRequest request, Callback<FindResponse> done) {
  CallPeer<FindResponse>(node_, AddressOf(to), kFindMethod, EncodeFindRequest(request),
                         options_.call_timeout, options_.limits, DecodeFindResponse,
                         std::move(done));
}

void NetDhtTransport::Serve(std::weak_ptr<DhtService> service) {
  ServeMethod<PingRequest>(
      node_, kPingMethod, service, options_.limits, DecodePingRequest,
      [](DhtService& s, const net::PeerId& from, const PingRequest& r) {
        return s.HandlePing(from, r);
      },
      EncodePingResponse);
  ServeMethod<StoreRequest>(
      node_, kStoreMethod, service, options_.limits, DecodeStoreRequest,
      [](DhtService& s, const net::PeerId& from, const StoreRequest& r) {
        return s.HandleStore(from, r);
      },
      EncodeStoreResponse);
  ServeMethod<FindRequest>(
      node_, kFindMethod, service, options_.limits, DecodeFindRequest,
      [](DhtService& s, const net::PeerId& from, const FindRequest& r) {
        return s.HandleFind(from, r);
      },
      EncodeFindResponse);
}

Contact NetDhtTransport::SelfContact(const net::Node& node) {
  std::vector<std::string> addresses;
  for (const auto& endpoint : node.visible_address().endpoints) {
    addresses.push_back(endpoint.ToString());
  }
  return Contact(node.peer_id(), std::move(addresses));
}

Result<Contact> NetDhtTransport::ContactFromAddress(const std::string& multiaddrs) {
  auto address = net::PeerAddress::ParseList(multiaddrs);
  if (!address.ok()) return address.status();
  std::vector<std::string> endpoints;
  for (const auto& endpoint : address->endpoints) endpoints.push_back(endpoint.ToString());
  return Contact(address->peer_id, std::move(endpoints));
}

}  // namespace hivemind::dht
