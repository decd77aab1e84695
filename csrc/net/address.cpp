#include "net/address.h"

#include <arpa/inet.h>

#include <charconv>

namespace hivemind::net {
namespace {

std::vector<std::string_view> SplitPath(std::string_view text) {
  std::vector<std::string_view> parts;
  size_t start = 1;
  while (start <= text.size()) {
    size_t end = text.find('/', start);
    if (end == std::string_view::npos) end = text.size();
    parts.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

Status Malformed(std::string_view text, const std::string& why) {
  return Status(StatusCode::kInvalidArgument,
                "bad address '" + std::string(text) + "': " + why +
                    " (expected like /ip4/1.2.3.4/tcp/31337/p2p/<peer id>)");
}

// Parses the first four components (/proto/host/tcp/port) of `parts`.
Result<Endpoint> ParseEndpointParts(std::string_view text,
                                    const std::vector<std::string_view>& parts) {
  if (text.empty() || text[0] != '/') return Malformed(text, "a multiaddr starts with '/'");
  if (parts.size() < 4) return Malformed(text, "it needs a host and a /tcp/ port");
  Endpoint endpoint;
  std::string host(parts[1]);
  if (parts[0] == "ip4") {
    in_addr ignored;
    if (inet_pton(AF_INET, host.c_str(), &ignored) != 1) return Malformed(text, "bad IPv4 address");
    endpoint.kind = Endpoint::Kind::kIp4;
  } else if (parts[0] == "ip6") {
    in6_addr ignored;
    if (inet_pton(AF_INET6, host.c_str(), &ignored) != 1)
      return Malformed(text, "bad IPv6 address");
    endpoint.kind = Endpoint::Kind::kIp6;
  } else if (parts[0] == "dns" || parts[0] == "dns4" || parts[0] == "dns6") {
    if (host.empty()) return Malformed(text, "empty host name");
    endpoint.kind = Endpoint::Kind::kDns;
  } else {
    return Malformed(text,
                     "unknown protocol '" + std::string(parts[0]) + "' (use ip4, ip6 or dns)");
  }
  endpoint.host = host;
  if (parts[2] != "tcp") return Malformed(text, "only /tcp/ transports are supported");
  unsigned port = 0;
  auto [end, error] = std::from_chars(parts[3].data(), parts[3].data() + parts[3].size(), port);
  if (error != std::errc() || end != parts[3].data() + parts[3].size() || port > 65535) {
    return Malformed(text, "port '" + std::string(parts[3]) + "' is not a number in 0..65535");
  }
  endpoint.port = static_cast<uint16_t>(port);
  return endpoint;
}

}  // namespace

Result<Endpoint> Endpoint::Parse(std::string_view multiaddr) {
  auto parts = SplitPath(multiaddr);
  auto endpoint = ParseEndpointParts(multiaddr, parts);
  if (endpoint.ok() && parts.size() != 4) {
    return Malformed(multiaddr, "unexpected components after the port");
  }
  return endpoint;
}

std::string Endpoint::ToString() const {
  const char* protocol = kind == Kind::kIp4 ? "ip4" : kind == Kind::kIp6 ? "ip6" : "dns";
  return "/" + std::string(protocol) + "/" + host + "/tcp/" + std::to_string(port);
}

std::string Endpoint::ZmqEndpoint() const {
  if (kind == Kind::kIp6) return "tcp://[" + host + "]:" + std::to_string(port);
  return "tcp://" + host + ":" + std::to_string(port);
}

Result<PeerAddress> PeerAddress::Parse(std::string_view multiaddr) {
  auto parts = SplitPath(multiaddr);
  auto endpoint = ParseEndpointParts(multiaddr, parts);
  if (!endpoint.ok()) return endpoint.status();
  if (parts.size() != 6 || (parts[4] != "p2p" && parts[4] != "ipfs")) {
    return Malformed(multiaddr, "it must end with /p2p/<peer id>");
  }
  auto id = PeerId::FromString(parts[5]);
  if (!id.ok()) return Malformed(multiaddr, id.status().message());
  return PeerAddress{*id, {*endpoint}};
}

Result<PeerAddress> PeerAddress::ParseList(std::string_view multiaddrs) {
  PeerAddress merged;
  bool any = false;
  size_t start = 0;
  while (start < multiaddrs.size()) {
    size_t end = multiaddrs.find_first_of(" ,\t\n", start);
    if (end == std::string_view::npos) end = multiaddrs.size();
    std::string_view one = multiaddrs.substr(start, end - start);
    start = end + 1;
    if (one.empty()) continue;
    auto address = Parse(one);
    if (!address.ok()) return address.status();
    if (any && address->peer_id != merged.peer_id) {
      return Malformed(one, "all addresses in one list must name the same peer");
    }
    merged.peer_id = address->peer_id;
    merged.endpoints.push_back(address->endpoints.front());
    any = true;
  }
  if (!any) return Malformed(multiaddrs, "no address given");
  return merged;
}

std::vector<std::string> PeerAddress::ToStrings() const {
  std::vector<std::string> texts;
  for (const auto& endpoint : endpoints) {
    texts.push_back(endpoint.ToString() + "/p2p/" + peer_id.ToString());
  }
  return texts;
}

std::string PeerAddress::ToString() const {
  std::string joined;
  for (const auto& text : ToStrings()) joined += (joined.empty() ? "" : " ") + text;
  return joined;
}

}  // namespace hivemind::net
