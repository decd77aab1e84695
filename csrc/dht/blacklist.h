#pragma once

#include <cstddef>
#include <unordered_map>

#include "dht/clock.h"
#include "net/peer_id.h"

namespace hivemind::dht {

// Peers that failed to answer are not called again for a while: base_seconds after the first
// failure, then base × backoff^n after each further one in a row (5, 10, 20, ... s by default), up
// to max_seconds. One successful call forgives everything. This keeps lookups from waiting on the
// same dead peer over and over while it is still listed in other nodes' answers.
class Blacklist {
 public:
  Blacklist(double base_seconds, double backoff, double max_seconds, size_t max_entries = 65536)
      : base_seconds_(base_seconds),
        backoff_(backoff),
        max_seconds_(max_seconds),
        max_entries_(max_entries) {}

  void RecordFailure(const net::PeerId& peer, DhtTime now);
  void Forgive(const net::PeerId& peer) { entries_.erase(peer); }
  bool IsBanned(const net::PeerId& peer, DhtTime now) const;
  // When the ban on `peer` ends (0 when not banned).
  DhtTime BannedUntil(const net::PeerId& peer) const;
  // Forgets peers whose ban ended long enough ago that their strike count no longer matters.
  void Purge(DhtTime now);
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    int strikes = 0;
    DhtTime banned_until = 0;
  };
  double base_seconds_;
  double backoff_;
  double max_seconds_;
  size_t max_entries_;
  std::unordered_map<net::PeerId, Entry> entries_;
};

}  // namespace hivemind::dht
