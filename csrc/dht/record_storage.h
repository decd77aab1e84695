#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "dht/clock.h"
#include "dht/dht_id.h"
#include "dht/dht_value.h"

namespace hivemind::dht {

// Caps every stored record must respect, so that one peer cannot make others hold unbounded data or
// data forever (hivemind enforces none of these).
struct StorageLimits {
  size_t max_value_bytes = size_t{64} << 10;
  size_t max_subkey_bytes = 1024;
  // A record may expire at most this far in the future, as seen by the storing node's clock.
  double max_ttl_seconds = 24 * 3600.0;
  size_t max_subkeys_per_key = 4096;
  size_t max_keys = size_t{1} << 20;
};

// Checks one write against the limits; the error names the cap that was hit.
Status CheckRecordLimits(const StorageLimits& limits, const std::optional<std::string>& subkey,
                         const TimedValue& value, DhtTime now);

// The records one node holds: key id -> DhtValue, with expiration enforced on every access. Not
// thread-safe (the DHT node serialises access).
class RecordStorage {
 public:
  // `evict_when_full`: a cache drops its soonest-expiring key to make room; the primary storage
  // refuses new keys instead, so that a flood of writes cannot push out records it is responsible
  // for.
  RecordStorage(StorageLimits limits, bool evict_when_full)
      : limits_(limits), evict_when_full_(evict_when_full) {}

  // Stores a regular value (no subkey) or one dictionary entry. OK when the write is visible now;
  // FAILED_PRECONDITION when a newer record supersedes it; INVALID_ARGUMENT when it is already
  // expired or expires too far ahead; RESOURCE_EXHAUSTED when a size or count cap is hit.
  // `raw_key` (the unhashed key, when the writer sent it) is remembered for validators.
  Status Store(const DhtId& key, const std::optional<std::string>& subkey, const TimedValue& value,
               DhtTime now, const std::optional<std::string>& raw_key = std::nullopt);
  // Merges another replica's state for `key` (entries failing the caps are skipped).
  void Merge(const DhtId& key, const DhtValue& value, DhtTime now,
             const std::optional<std::string>& raw_key = std::nullopt);
  // The live value, if any. Expired entries are dropped on the way.
  std::optional<DhtValue> Get(const DhtId& key, DhtTime now);

  // The unhashed key of `key`, if a writer ever sent it.
  std::optional<std::string> RawKey(const DhtId& key) const;

  void PurgeExpired(DhtTime now);
  std::vector<DhtId> Keys() const;
  size_t size() const { return values_.size(); }
  const StorageLimits& limits() const { return limits_; }

 private:
  bool MakeRoom(DhtTime now);

  StorageLimits limits_;
  bool evict_when_full_;
  struct Entry {
    DhtValue value;
    std::optional<std::string> raw_key;
  };
  std::unordered_map<DhtId, Entry> values_;
};

}  // namespace hivemind::dht
