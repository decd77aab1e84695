#include "dht/routing_table.h"

#include <algorithm>

namespace hivemind::dht {

RoutingTable::RoutingTable(const DhtId& self, RoutingTableOptions options)
    : self_(self), options_(options) {
  if (options_.bucket_size == 0) options_.bucket_size = 1;
  if (options_.depth_modulo < 1) options_.depth_modulo = 1;
  if (options_.failures_to_evict < 1) options_.failures_to_evict = 1;
  buckets_.push_back(Bucket{});  // depth 0 covers the whole space
}

size_t RoutingTable::BucketIndex(const DhtId& id) const {
  for (size_t i = 0; i < buckets_.size(); ++i) {
    if (buckets_[i].Covers(id)) return i;
  }
  return 0;  // unreachable: buckets partition the space
}

bool RoutingTable::CanSplit(const Bucket& bucket) const {
  if (bucket.depth >= DhtId::kBits) return false;
  return bucket.Covers(self_) || bucket.depth % options_.depth_modulo != 0;
}

void RoutingTable::Split(size_t index) {
  Bucket old = std::move(buckets_[index]);
  Bucket low, high;
  low.depth = high.depth = old.depth + 1;
  low.prefix = old.prefix.WithBit(old.depth, false);
  high.prefix = old.prefix.WithBit(old.depth, true);
  low.last_changed = high.last_changed = old.last_changed;
  for (auto& entry : old.entries) {
    (entry.contact.id.Bit(old.depth) ? high : low).entries.push_back(std::move(entry));
  }
  for (auto& contact : old.replacements) {
    (contact.id.Bit(old.depth) ? high : low).replacements.push_back(std::move(contact));
  }
  buckets_[index] = std::move(low);
  buckets_.insert(buckets_.begin() + static_cast<std::ptrdiff_t>(index) + 1, std::move(high));
}

RoutingTable::SeenResult RoutingTable::Seen(const Contact& contact, DhtTime now) {
  if (contact.id == self_) return {Outcome::kIgnored, std::nullopt};
  while (true) {
    const size_t index = BucketIndex(contact.id);
    Bucket& bucket = buckets_[index];
    auto known = std::find_if(bucket.entries.begin(), bucket.entries.end(),
                              [&](const Entry& e) { return e.contact.peer_id == contact.peer_id; });
    if (known != bucket.entries.end()) {
      Entry entry = std::move(*known);
      bucket.entries.erase(known);
      entry.contact.addresses = contact.addresses;  // it may have moved
      entry.last_seen = now;
      entry.failures = 0;
      bucket.entries.push_back(std::move(entry));
      bucket.last_changed = now;
      return {Outcome::kUpdated, std::nullopt};
    }
    if (bucket.entries.size() < options_.bucket_size) {
      auto& reps = bucket.replacements;
      reps.erase(std::remove_if(reps.begin(), reps.end(),
                                [&](const Contact& c) { return c.peer_id == contact.peer_id; }),
                 reps.end());
      bucket.entries.push_back(Entry{contact, now, 0});
      bucket.last_changed = now;
      return {Outcome::kAdded, std::nullopt};
    }
    if (CanSplit(bucket)) {
      Split(index);
      continue;
    }
    auto& reps = bucket.replacements;
    reps.erase(std::remove_if(reps.begin(), reps.end(),
                              [&](const Contact& c) { return c.peer_id == contact.peer_id; }),
               reps.end());
    reps.push_back(contact);
    while (reps.size() > options_.max_replacements) reps.pop_front();
    SeenResult result{Outcome::kCachedReplacement, std::nullopt};
    const Entry& oldest = bucket.entries.front();
    if (now - oldest.last_seen >= options_.ping_after_silence_seconds) {
      result.ping_candidate = oldest.contact;
    }
    return result;
  }
}

void RoutingTable::RemoveEntry(Bucket& bucket, size_t position) {
  bucket.entries.erase(bucket.entries.begin() + static_cast<std::ptrdiff_t>(position));
  if (!bucket.replacements.empty()) {
    // The newest replacement was seen most recently, so it is the likeliest to be alive. Its
    // last_seen is unknown here: 0 puts it first in line for a liveness ping.
    bucket.entries.insert(bucket.entries.begin(), Entry{bucket.replacements.back(), 0, 0});
    bucket.replacements.pop_back();
  }
}

bool RoutingTable::Failed(const net::PeerId& peer) {
  const DhtId id = DhtId::OfPeer(peer);
  Bucket& bucket = buckets_[BucketIndex(id)];
  for (size_t i = 0; i < bucket.entries.size(); ++i) {
    if (bucket.entries[i].contact.peer_id != peer) continue;
    if (++bucket.entries[i].failures >= options_.failures_to_evict) {
      RemoveEntry(bucket, i);
      return true;
    }
    return false;
  }
  auto& reps = bucket.replacements;
  reps.erase(
      std::remove_if(reps.begin(), reps.end(), [&](const Contact& c) { return c.peer_id == peer; }),
      reps.end());
  return false;
}

bool RoutingTable::Evict(const net::PeerId& peer) {
  const DhtId id = DhtId::OfPeer(peer);
  Bucket& bucket = buckets_[BucketIndex(id)];
  for (size_t i = 0; i < bucket.entries.size(); ++i) {
    if (bucket.entries[i].contact.peer_id == peer) {
      RemoveEntry(bucket, i);
      return true;
    }
  }
  return false;
}

bool RoutingTable::Contains(const net::PeerId& peer) const {
  const Bucket& bucket = buckets_[BucketIndex(DhtId::OfPeer(peer))];
  return std::any_of(bucket.entries.begin(), bucket.entries.end(),
                     [&](const Entry& e) { return e.contact.peer_id == peer; });
}

std::vector<Contact> RoutingTable::Nearest(const DhtId& target, size_t count,
                                           const net::PeerId* exclude) const {
  std::vector<std::pair<DhtId, const Contact*>> all;
  for (const auto& bucket : buckets_) {
    for (const auto& entry : bucket.entries) {
      if (exclude && entry.contact.peer_id == *exclude) continue;
      all.emplace_back(entry.contact.id.Xor(target), &entry.contact);
    }
  }
  const size_t n = std::min(count, all.size());
  std::partial_sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(n), all.end(),
                    [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<Contact> nearest;
  nearest.reserve(n);
  for (size_t i = 0; i < n; ++i) nearest.push_back(*all[i].second);
  return nearest;
}

std::vector<Contact> RoutingTable::AllContacts() const {
  std::vector<Contact> all;
  for (const auto& bucket : buckets_) {
    for (const auto& entry : bucket.entries) all.push_back(entry.contact);
  }
  return all;
}

void RoutingTable::MarkRefreshed(const DhtId& target, DhtTime now) {
  buckets_[BucketIndex(target)].last_changed = now;
}

std::vector<DhtId> RoutingTable::StaleBucketTargets(DhtTime now, double max_age_seconds,
                                                    std::mt19937_64& rng) const {
  std::vector<DhtId> targets;
  for (const auto& bucket : buckets_) {
    if (now - bucket.last_changed >= max_age_seconds) {
      targets.push_back(DhtId::RandomWithPrefix(bucket.prefix, bucket.depth, rng));
    }
  }
  return targets;
}

size_t RoutingTable::size() const {
  size_t total = 0;
  for (const auto& bucket : buckets_) total += bucket.entries.size();
  return total;
}

}  // namespace hivemind::dht
