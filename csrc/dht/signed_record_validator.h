#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "dht/record_validator.h"
#include "net/identity.h"
#include "net/peer_id.h"

namespace hivemind::dht {

// Records that only their owner can write. A key or subkey that contains "[owner:<peer id>]" (the
// owner's Ed25519 public key in base58, see OwnerMarker) names its owner; the value must then end
// with "[signature:" + 64-byte Ed25519 signature + "]", made by that owner's identity over the key
// id, subkey, value and expiration. The signature is checked by every storing node and every reader
// and stripped before the user sees the value. Because it covers the expiration, an old record
// replayed later loses to the newer one (newer expiration wins) or is refused as expired.
//
// Records whose key and subkey name no owner are left alone. A storing node sees an owner named in
// the *key* only when the writer sends the raw key, which this validator asks for; readers always
// know the key, so a forged record under an owned key is never returned to a user. Owners named in
// the subkey are enforced everywhere.
class SignedRecordValidator : public RecordValidator {
 public:
  // `identity` signs records owned by this node; without one the validator only verifies.
  explicit SignedRecordValidator(std::optional<net::Identity> identity = std::nullopt)
      : identity_(std::move(identity)) {}

  static std::string OwnerMarker(const net::PeerId& owner);

  Status Validate(const DhtRecord& record) const override;
  Result<std::string> Sign(const DhtRecord& record) const override;
  std::string Strip(const DhtRecord& record) const override;
  bool NeedsRawKey(const std::string& raw_key) const override;

 private:
  // The owner a record names (subkey first, then raw key); an error when a marker is malformed.
  static Result<std::optional<net::PeerId>> OwnerOf(const DhtRecord& record);
  static std::string SignedBytes(const DhtRecord& record, std::string_view stripped_value);

  std::optional<net::Identity> identity_;
};

}  // namespace hivemind::dht
