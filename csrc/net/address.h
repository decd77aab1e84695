#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "net/peer_id.h"

namespace hivemind::net {

// One network endpoint in multiaddr form: /ip4/1.2.3.4/tcp/31337, /ip6/::1/tcp/31337 or
// /dns/host.example/tcp/31337 (also dns4/dns6).
struct Endpoint {
  enum class Kind { kIp4, kIp6, kDns };
  Kind kind = Kind::kIp4;
  std::string host;
  uint16_t port = 0;

  static Result<Endpoint> Parse(std::string_view multiaddr);
  std::string ToString() const;     // multiaddr form
  std::string ZmqEndpoint() const;  // tcp://1.2.3.4:31337, tcp://[::1]:31337
  bool operator==(const Endpoint& o) const {
    return kind == o.kind && host == o.host && port == o.port;
  }
};

// Where to reach a peer, and who it must prove to be: /ip4/1.2.3.4/tcp/31337/p2p/<peer id>.
// This is the string a user pastes into another machine's command line (HIVEMIND_INITIAL_PEERS).
struct PeerAddress {
  PeerId peer_id;
  std::vector<Endpoint> endpoints;  // tried in order; empty = use an existing connection

  // One multiaddr with a /p2p/ suffix.
  static Result<PeerAddress> Parse(std::string_view multiaddr);
  // Several multiaddrs of one peer, separated by spaces or commas.
  static Result<PeerAddress> ParseList(std::string_view multiaddrs);
  // One multiaddr per endpoint, each ending in /p2p/<id>.
  std::vector<std::string> ToStrings() const;
  std::string ToString() const;  // ToStrings() joined by spaces
};

}  // namespace hivemind::net
