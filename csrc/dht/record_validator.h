#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "dht/clock.h"
#include "dht/dht_id.h"

namespace hivemind::dht {

// One record as validators see it.
struct DhtRecord {
  DhtId key_id;
  // The user's key before hashing, when known (always on the writer and the reader; on a storing
  // node only when the writer sent it because a validator needs it).
  std::optional<std::string> raw_key;
  std::optional<std::string> subkey;
  std::string value;
  DhtTime expiration = 0;
};

// A rule every record must satisfy. Storing nodes call Validate on each write they receive, readers
// on each value they get back (so a node that stores garbage cannot hand it out); writers call Sign
// before sending, readers Strip before returning the value to the user.
class RecordValidator {
 public:
  virtual ~RecordValidator() = default;
  // OK, or why the record is refused (usually PERMISSION_DENIED or INVALID_ARGUMENT).
  virtual Status Validate(const DhtRecord& record) const = 0;
  // The value to send for `record` (e.g. with a signature appended).
  virtual Result<std::string> Sign(const DhtRecord& record) const { return record.value; }
  // The value to hand to the user (e.g. without the signature).
  virtual std::string Strip(const DhtRecord& record) const { return record.value; }
  // Whether storing nodes must see the raw key of this record to validate it.
  virtual bool NeedsRawKey(const std::string& raw_key) const {
    (void)raw_key;
    return false;
  }
};

// Several validators at once: all must accept; signing runs in order, stripping in reverse order.
class CompositeValidator : public RecordValidator {
 public:
  explicit CompositeValidator(std::vector<std::shared_ptr<const RecordValidator>> validators)
      : validators_(std::move(validators)) {}

  Status Validate(const DhtRecord& record) const override {
    DhtRecord current = record;
    for (auto it = validators_.rbegin(); it != validators_.rend(); ++it) {
      Status status = (*it)->Validate(current);
      if (!status.ok()) return status;
      current.value = (*it)->Strip(current);
    }
    return Status::Ok();
  }
  Result<std::string> Sign(const DhtRecord& record) const override {
    DhtRecord current = record;
    for (const auto& validator : validators_) {
      auto signed_value = validator->Sign(current);
      if (!signed_value.ok()) return signed_value.status();
      current.value = std::move(signed_value).value();
    }
    return current.value;
  }
  std::string Strip(const DhtRecord& record) const override {
    DhtRecord current = record;
    for (auto it = validators_.rbegin(); it != validators_.rend(); ++it) {
      current.value = (*it)->Strip(current);
    }
    return current.value;
  }
  bool NeedsRawKey(const std::string& raw_key) const override {
    for (const auto& validator : validators_) {
      if (validator->NeedsRawKey(raw_key)) return true;
    }
    return false;
  }

 private:
  std::vector<std::shared_ptr<const RecordValidator>> validators_;
};

}  // namespace hivemind::dht
