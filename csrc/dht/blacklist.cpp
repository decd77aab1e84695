#include "dht/blacklist.h"

#include <algorithm>
#include <cmath>

namespace hivemind::dht {

void Blacklist::RecordFailure(const net::PeerId& peer, DhtTime now) {
  if (entries_.size() >= max_entries_ && entries_.count(peer) == 0) Purge(now);
  if (entries_.size() >= max_entries_ && entries_.count(peer) == 0) return;  // bounded memory
  Entry& entry = entries_[peer];
  // Failures of calls that were already in flight when the ban began do not compound it.
  if (entry.banned_until > now) return;
  const double ban = std::min(max_seconds_, base_seconds_ * std::pow(backoff_, entry.strikes));
  entry.strikes += 1;
  entry.banned_until = now + ban;
}

bool Blacklist::IsBanned(const net::PeerId& peer, DhtTime now) const {
  auto it = entries_.find(peer);
  return it != entries_.end() && it->second.banned_until > now;
}

DhtTime Blacklist::BannedUntil(const net::PeerId& peer) const {
  auto it = entries_.find(peer);
  return it == entries_.end() ? 0 : it->second.banned_until;
}

void Blacklist::Purge(DhtTime now) {
  for (auto it = entries_.begin(); it != entries_.end();) {
    it = it->second.banned_until + max_seconds_ < now ? entries_.erase(it) : std::next(it);
  }
}

}  // namespace hivemind::dht
