#include "dht/record_storage.h"

#include <cmath>

namespace hivemind::dht {

Status CheckRecordLimits(const StorageLimits& limits, const std::optional<std::string>& subkey,
                         const TimedValue& value, DhtTime now) {
  if (!std::isfinite(value.expiration)) {
    return Status(StatusCode::kInvalidArgument, "expiration time is not a finite number");
  }
  if (value.expiration <= now) {
    return Status(StatusCode::kInvalidArgument, "record already expired (expiration " +
                                                    std::to_string(value.expiration) + " <= now " +
                                                    std::to_string(now) + ")");
  }
  if (value.expiration > now + limits.max_ttl_seconds) {
    return Status(StatusCode::kInvalidArgument, "expiration is " +
                                                    std::to_string(value.expiration - now) +
                                                    " s ahead, more than the cap of " +
                                                    std::to_string(limits.max_ttl_seconds) + " s");
  }
  if (value.value.size() > limits.max_value_bytes) {
    return Status(StatusCode::kResourceExhausted,
                  "value of " + std::to_string(value.value.size()) + " bytes exceeds the cap of " +
                      std::to_string(limits.max_value_bytes) + " bytes");
  }
  if (subkey && subkey->size() > limits.max_subkey_bytes) {
    return Status(StatusCode::kResourceExhausted,
                  "subkey of " + std::to_string(subkey->size()) + " bytes exceeds the cap of " +
                      std::to_string(limits.max_subkey_bytes) + " bytes");
  }
  return Status::Ok();
}

Status RecordStorage::Store(const DhtId& key, const std::optional<std::string>& subkey,
                            const TimedValue& value, DhtTime now,
                            const std::optional<std::string>& raw_key) {
  Status allowed = CheckRecordLimits(limits_, subkey, value, now);
  if (!allowed.ok()) return allowed;

  auto it = values_.find(key);
  if (it != values_.end() && !it->second.value.DropExpired(now)) {
    values_.erase(it);
    it = values_.end();
  }
  if (it == values_.end()) {
    if (values_.size() >= limits_.max_keys && !MakeRoom(now)) {
      return Status(StatusCode::kResourceExhausted,
                    "storage holds the maximum of " + std::to_string(limits_.max_keys) + " keys");
    }
    it = values_.emplace(key, Entry{}).first;
  }
  if (raw_key && !it->second.raw_key) it->second.raw_key = raw_key;
  DhtValue& stored = it->second.value;
  bool visible;
  if (subkey) {
    if (stored.dictionary().count(*subkey) == 0 &&
        stored.dictionary().size() >= limits_.max_subkeys_per_key) {
      return Status(StatusCode::kResourceExhausted,
                    "key already has the maximum of " +
                        std::to_string(limits_.max_subkeys_per_key) + " subkeys");
    }
    visible = stored.StoreSubkey(*subkey, value);
  } else {
    visible = stored.StoreRegular(value);
  }
  if (stored.empty()) values_.erase(it);
  if (!visible) {
    return Status(StatusCode::kFailedPrecondition,
                  "a record with a later expiration is already stored under this key");
  }
  return Status::Ok();
}

void RecordStorage::Merge(const DhtId& key, const DhtValue& value, DhtTime now,
                          const std::optional<std::string>& raw_key) {
  if (value.regular()) Store(key, std::nullopt, *value.regular(), now, raw_key);
  for (const auto& [subkey, entry] : value.dictionary()) Store(key, subkey, entry, now, raw_key);
}

std::optional<DhtValue> RecordStorage::Get(const DhtId& key, DhtTime now) {
  auto it = values_.find(key);
  if (it == values_.end()) return std::nullopt;
  if (!it->second.value.DropExpired(now)) {
    values_.erase(it);
    return std::nullopt;
  }
  return it->second.value;
}

std::optional<std::string> RecordStorage::RawKey(const DhtId& key) const {
  auto it = values_.find(key);
  return it == values_.end() ? std::nullopt : it->second.raw_key;
}

void RecordStorage::PurgeExpired(DhtTime now) {
  for (auto it = values_.begin(); it != values_.end();) {
    it = it->second.value.DropExpired(now) ? std::next(it) : values_.erase(it);
  }
}

std::vector<DhtId> RecordStorage::Keys() const {
  std::vector<DhtId> keys;
  keys.reserve(values_.size());
  for (const auto& entry : values_) keys.push_back(entry.first);
  return keys;
}

bool RecordStorage::MakeRoom(DhtTime now) {
  PurgeExpired(now);
  if (values_.size() < limits_.max_keys) return true;
  if (!evict_when_full_ || values_.empty()) return false;
  auto victim = values_.begin();
  for (auto it = values_.begin(); it != values_.end(); ++it) {
    if (it->second.value.latest_expiration() < victim->second.value.latest_expiration()) {
      victim = it;
    }
  }
  values_.erase(victim);
  return true;
}

}  // namespace hivemind::dht
