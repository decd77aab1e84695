#pragma once

#include <string>
#include <utility>
#include <vector>

#include "dht/dht_id.h"
#include "net/peer_id.h"

namespace hivemind::dht {

// A DHT server as other nodes know it: who it is, where it listens, and (derived from the peer id,
// never taken from the wire) where it sits in the key space.
struct Contact {
  net::PeerId peer_id;
  DhtId id;
  // Multiaddrs without the /p2p/ suffix ("/ip4/1.2.3.4/tcp/5"). Empty in a simulation, where the
  // virtual transport routes by peer id.
  std::vector<std::string> addresses;

  Contact() = default;
  Contact(const net::PeerId& peer, std::vector<std::string> addrs)
      : peer_id(peer), id(DhtId::OfPeer(peer)), addresses(std::move(addrs)) {}
};

}  // namespace hivemind::dht
