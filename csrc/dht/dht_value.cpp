#include "dht/dht_value.h"

#include <algorithm>

namespace hivemind::dht {

DhtValue DhtValue::Regular(std::string value, DhtTime expiration) {
  DhtValue result;
  result.regular_ = TimedValue{std::move(value), expiration};
  return result;
}

DhtValue DhtValue::Subkey(std::string subkey, std::string value, DhtTime expiration) {
  DhtValue result;
  result.dictionary_.emplace(std::move(subkey), TimedValue{std::move(value), expiration});
  return result;
}

bool DhtValue::StoreRegular(const TimedValue& value) {
  if (regular_ && !Supersedes(value, *regular_)) {
    const bool identical =
        value.expiration == regular_->expiration && value.value == regular_->value;
    return identical && dictionary_.empty();
  }
  regular_ = value;
  // Subkeys that expire no later than the new regular value are overwritten by it.
  for (auto it = dictionary_.begin(); it != dictionary_.end();) {
    it = it->second.expiration <= value.expiration ? dictionary_.erase(it) : std::next(it);
  }
  return dictionary_.empty();
}

bool DhtValue::StoreSubkey(const std::string& subkey, const TimedValue& value) {
  if (regular_ && value.expiration <= regular_->expiration) return false;
  auto it = dictionary_.find(subkey);
  if (it == dictionary_.end()) {
    dictionary_.emplace(subkey, value);
    return true;
  }
  if (Supersedes(value, it->second)) {
    it->second = value;
    return true;
  }
  return value.expiration == it->second.expiration && value.value == it->second.value;
}

void DhtValue::Merge(const DhtValue& other) {
  if (other.regular_) StoreRegular(*other.regular_);
  for (const auto& [subkey, value] : other.dictionary_) StoreSubkey(subkey, value);
}

bool DhtValue::DropExpired(DhtTime now) {
  if (regular_ && regular_->expiration <= now) regular_.reset();
  for (auto it = dictionary_.begin(); it != dictionary_.end();) {
    it = it->second.expiration <= now ? dictionary_.erase(it) : std::next(it);
  }
  return !empty();
}

DhtTime DhtValue::latest_expiration() const {
  DhtTime latest = regular_ ? regular_->expiration : -1.0;
  for (const auto& entry : dictionary_) latest = std::max(latest, entry.second.expiration);
  return latest;
}

size_t DhtValue::ByteSize() const {
  size_t total = regular_ ? regular_->value.size() : 0;
  for (const auto& [subkey, value] : dictionary_) total += subkey.size() + value.value.size();
  return total;
}

bool DhtValue::operator==(const DhtValue& other) const {
  auto same = [](const TimedValue& a, const TimedValue& b) {
    return a.expiration == b.expiration && a.value == b.value;
  };
  if (regular_.has_value() != other.regular_.has_value()) return false;
  if (regular_ && !same(*regular_, *other.regular_)) return false;
  if (dictionary_.size() != other.dictionary_.size()) return false;
  for (const auto& [subkey, value] : dictionary_) {
    auto it = other.dictionary_.find(subkey);
    if (it == other.dictionary_.end() || !same(value, it->second)) return false;
  }
  return true;
}

}  // namespace hivemind::dht
