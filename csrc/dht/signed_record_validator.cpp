#include "dht/signed_record_validator.h"

#include <cstring>

namespace hivemind::dht {

namespace {

constexpr std::string_view kOwnerOpen = "[owner:";
constexpr std::string_view kSignatureOpen = "[signature:";
constexpr size_t kSignatureBytes = 64;
constexpr size_t kSuffixBytes = kSignatureOpen.size() + kSignatureBytes + 1;
constexpr std::string_view kDomain = "hivemind-dht-signed-record-v1";

// "[owner:...]" inside `text`: nullopt when absent, an error when it does not name a peer id.
Result<std::optional<net::PeerId>> FindOwner(std::string_view text) {
  const size_t open = text.find(kOwnerOpen);
  if (open == std::string_view::npos) return std::optional<net::PeerId>();
  const size_t start = open + kOwnerOpen.size();
  const size_t close = text.find(']', start);
  if (close == std::string_view::npos) {
    return Status(StatusCode::kInvalidArgument, "owner marker is not closed by ']'");
  }
  auto owner = net::PeerId::FromString(text.substr(start, close - start));
  if (!owner.ok()) return owner.status().WithContext("owner marker");
  return std::optional<net::PeerId>(*owner);
}

void AppendLength(std::string& out, uint64_t n) {
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
}

}  // namespace

std::string SignedRecordValidator::OwnerMarker(const net::PeerId& owner) {
  return std::string(kOwnerOpen) + owner.ToString() + "]";
}

Result<std::optional<net::PeerId>> SignedRecordValidator::OwnerOf(const DhtRecord& record) {
  if (record.subkey) {
    auto owner = FindOwner(*record.subkey);
    if (!owner.ok() || owner->has_value()) return owner;
  }
  if (record.raw_key) return FindOwner(*record.raw_key);
  return std::optional<net::PeerId>();
}

std::string SignedRecordValidator::SignedBytes(const DhtRecord& record,
                                               std::string_view stripped_value) {
  std::string bytes(kDomain);
  bytes.append(record.key_id.raw());
  bytes.push_back(record.subkey ? 1 : 0);
  if (record.subkey) {
    AppendLength(bytes, record.subkey->size());
    bytes.append(*record.subkey);
  }
  AppendLength(bytes, stripped_value.size());
  bytes.append(stripped_value);
  uint64_t expiration_bits;
  static_assert(sizeof(expiration_bits) == sizeof(record.expiration));
  std::memcpy(&expiration_bits, &record.expiration, sizeof(expiration_bits));
  AppendLength(bytes, expiration_bits);
  return bytes;
}

Status SignedRecordValidator::Validate(const DhtRecord& record) const {
  auto owner = OwnerOf(record);
  if (!owner.ok()) return owner.status();
  if (!owner->has_value()) return Status::Ok();
  const std::string& value = record.value;
  if (value.size() < kSuffixBytes ||
      std::string_view(value).substr(value.size() - kSuffixBytes, kSignatureOpen.size()) !=
          kSignatureOpen ||
      value.back() != ']') {
    return Status(StatusCode::kPermissionDenied,
                  "record owned by " + (*owner)->ShortString() + " carries no signature");
  }
  const std::string_view stripped(value.data(), value.size() - kSuffixBytes);
  const std::string_view signature(value.data() + value.size() - kSignatureBytes - 1,
                                   kSignatureBytes);
  if (!net::Identity::Verify(**owner, SignedBytes(record, stripped), signature)) {
    return Status(StatusCode::kPermissionDenied,
                  "signature does not match owner " + (*owner)->ShortString());
  }
  return Status::Ok();
}

Result<std::string> SignedRecordValidator::Sign(const DhtRecord& record) const {
  auto owner = OwnerOf(record);
  if (!owner.ok()) return owner.status();
  if (!owner->has_value()) return record.value;
  if (!identity_ || identity_->peer_id() != **owner) {
    return Status(
        StatusCode::kPermissionDenied,
        "record is owned by " + (*owner)->ShortString() +
            (identity_ ? ", not by this node's identity " + identity_->peer_id().ShortString()
                       : std::string(", and this node has no identity to sign with")));
  }
  std::string signed_value = record.value;
  signed_value.append(kSignatureOpen);
  signed_value.append(identity_->Sign(SignedBytes(record, record.value)));
  signed_value.push_back(']');
  return signed_value;
}

std::string SignedRecordValidator::Strip(const DhtRecord& record) const {
  auto owner = OwnerOf(record);
  if (!owner.ok() || !owner->has_value() || record.value.size() < kSuffixBytes) {
    return record.value;
  }
  return record.value.substr(0, record.value.size() - kSuffixBytes);
}

bool SignedRecordValidator::NeedsRawKey(const std::string& raw_key) const {
  return raw_key.find(kOwnerOpen) != std::string::npos;
}

}  // namespace hivemind::dht
