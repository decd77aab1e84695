#pragma once

#include <cstddef>
#include <map>
#include <optional>
#include <string>

#include "dht/clock.h"

namespace hivemind::dht {

// One value with its absolute expiration time.
struct TimedValue {
  std::string value;
  DhtTime expiration = 0;
};

// True when (value, expiration) `a` beats `b`: the later expiration wins, and equal expirations are
// settled by comparing the bytes so that every replica picks the same winner whatever the order in
// which it saw the two.
inline bool Supersedes(const TimedValue& a, const TimedValue& b) {
  if (a.expiration != b.expiration) return a.expiration > b.expiration;
  return a.value > b.value;
}

// What a DHT key holds: a regular value, or a dictionary of subkey -> value, each entry with its
// own expiration (hivemind's semantics).
//
// Replicas receive writes in different orders and readers merge answers from several replicas, so
// the state is a join-semilattice: merging is commutative, associative and idempotent.
//  - `regular` is the newest regular value written to the key.
//  - `dictionary` holds, per subkey, the newest entry, but only entries that expire after
//  `regular`:
//    writing a regular value overwrites every older subkey, and an older subkey can never come
//    back.
//  - The visible value is the dictionary when it has entries, otherwise the regular value.
class DhtValue {
 public:
  static DhtValue Regular(std::string value, DhtTime expiration);
  static DhtValue Subkey(std::string subkey, std::string value, DhtTime expiration);

  // Folds one write into the state. Returns true when the write is visible afterwards (it won, or
  // an identical write was already there); false when something newer supersedes it.
  bool StoreRegular(const TimedValue& value);
  bool StoreSubkey(const std::string& subkey, const TimedValue& value);
  // Folds another replica's state into this one.
  void Merge(const DhtValue& other);
  // Forgets entries that expired at or before `now`. Returns false when nothing live is left.
  bool DropExpired(DhtTime now);

  bool empty() const { return !regular_ && dictionary_.empty(); }
  bool is_dictionary() const { return !dictionary_.empty(); }
  // The newest regular value (also kept under a visible dictionary, as the floor that masks older
  // subkeys).
  const std::optional<TimedValue>& regular() const { return regular_; }
  const std::map<std::string, TimedValue>& dictionary() const { return dictionary_; }
  // The latest expiration of anything held: how fresh this value is.
  DhtTime latest_expiration() const;
  // Bytes of values and subkeys, for storage accounting.
  size_t ByteSize() const;

  bool operator==(const DhtValue& other) const;

 private:
  std::optional<TimedValue> regular_;
  std::map<std::string, TimedValue> dictionary_;
};

}  // namespace hivemind::dht
