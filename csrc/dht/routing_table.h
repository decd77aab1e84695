#pragma once

#include <cstddef>
#include <deque>
#include <optional>
#include <random>
#include <vector>

#include "dht/clock.h"
#include "dht/contact.h"
#include "dht/dht_id.h"

namespace hivemind::dht {

struct RoutingTableOptions {
  // k: contacts per bucket.
  size_t bucket_size = 20;
  // Kademlia §4.2 relaxed split rule: a full bucket that does not hold our own id is still split
  // while its depth is not a multiple of this, so the table stays dense around ids we are not near.
  int depth_modulo = 5;
  // Fresh contacts remembered per full bucket, promoted when a member is dropped.
  size_t max_replacements = 20;
  // Failed calls in a row after which a contact is dropped from its bucket.
  int failures_to_evict = 2;
  // A full bucket only asks to ping its least-recently-seen member if that member has been silent
  // this long, so a busy node does not ping on every new contact.
  double ping_after_silence_seconds = 60;
};

// Kademlia k-buckets over the 160-bit id space. Each bucket covers the ids that share a prefix; the
// buckets partition the space. Contacts inside a bucket are kept least-recently-seen first, because
// long-lived nodes are the likeliest to stay (the Kademlia paper's observation). Not thread-safe.
class RoutingTable {
 public:
  enum class Outcome {
    kAdded,              // a new contact entered a bucket
    kUpdated,            // already known: moved to the most-recently-seen end
    kCachedReplacement,  // its bucket is full: kept as a replacement
    kIgnored,            // our own id
  };
  struct SeenResult {
    Outcome outcome;
    // When the bucket is full: its least-recently-seen member, worth pinging; drop it with Evict()
    // if it does not answer, and the newest replacement takes its place.
    std::optional<Contact> ping_candidate;
  };

  RoutingTable(const DhtId& self, RoutingTableOptions options);

  // A successful exchange with `contact` (an answer to our call, or a call from a server).
  SeenResult Seen(const Contact& contact, DhtTime now);
  // A call to `peer` failed. Returns true when that dropped the contact from its bucket.
  bool Failed(const net::PeerId& peer);
  // Drops `peer` at once (it failed a liveness ping). Returns true if it was in a bucket.
  bool Evict(const net::PeerId& peer);

  bool Contains(const net::PeerId& peer) const;
  // Up to `count` contacts nearest to `target`, nearest first, never `exclude`.
  std::vector<Contact> Nearest(const DhtId& target, size_t count,
                               const net::PeerId* exclude = nullptr) const;
  std::vector<Contact> AllContacts() const;

  // A lookup near `target` just ran: its bucket counts as fresh.
  void MarkRefreshed(const DhtId& target, DhtTime now);
  // For every bucket nobody touched in `max_age_seconds`: a random id inside it, to look up.
  std::vector<DhtId> StaleBucketTargets(DhtTime now, double max_age_seconds,
                                        std::mt19937_64& rng) const;

  const DhtId& self() const { return self_; }
  size_t size() const;
  size_t bucket_count() const { return buckets_.size(); }
  const RoutingTableOptions& options() const { return options_; }

 private:
  struct Entry {
    Contact contact;
    DhtTime last_seen = 0;
    int failures = 0;
  };
  struct Bucket {
    DhtId prefix;  // bits beyond `depth` are zero
    int depth = 0;
    std::vector<Entry> entries;        // least recently seen first
    std::deque<Contact> replacements;  // newest last
    DhtTime last_changed = 0;

    bool Covers(const DhtId& id) const { return prefix.CommonPrefixBits(id) >= depth; }
  };

  size_t BucketIndex(const DhtId& id) const;
  bool CanSplit(const Bucket& bucket) const;
  void Split(size_t index);
  void RemoveEntry(Bucket& bucket, size_t position);

  DhtId self_;
  RoutingTableOptions options_;
  std::vector<Bucket> buckets_;
};

}  // namespace hivemind::dht
