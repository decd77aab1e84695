#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <string_view>

#include "common/status.h"

namespace hivemind::net {

// A peer's identity: its Ed25519 public key. The text form is base58 (as libp2p users are used to);
// because the id *is* the key, an address that names a peer id is enough to authenticate that peer.
class PeerId {
 public:
  static constexpr size_t kSize = 32;
  using Bytes = std::array<uint8_t, kSize>;

  PeerId() { bytes_.fill(0); }
  explicit PeerId(const Bytes& public_key) : bytes_(public_key) {}

  // Parses the base58 text form; fails with kInvalidArgument naming what is wrong.
  static Result<PeerId> FromString(std::string_view text);
  static Result<PeerId> FromBytes(std::string_view raw);

  const Bytes& bytes() const { return bytes_; }
  std::string_view raw() const {
    return std::string_view(reinterpret_cast<const char*>(bytes_.data()), bytes_.size());
  }
  std::string ToString() const;
  // First characters of the text form, for logs.
  std::string ShortString() const;
  bool IsZero() const;

  // The X25519 key the same peer uses for CURVE encryption (libsodium's Ed25519 -> X25519 map).
  Result<std::array<uint8_t, 32>> CurvePublicKey() const;

  bool operator==(const PeerId& other) const { return bytes_ == other.bytes_; }
  bool operator!=(const PeerId& other) const { return bytes_ != other.bytes_; }
  bool operator<(const PeerId& other) const { return bytes_ < other.bytes_; }

 private:
  Bytes bytes_;
};

}  // namespace hivemind::net

template <>
struct std::hash<hivemind::net::PeerId> {
  size_t operator()(const hivemind::net::PeerId& id) const {
    size_t h;
    static_assert(sizeof(h) <= hivemind::net::PeerId::kSize);
    std::memcpy(&h, id.bytes().data(), sizeof(h));
    return h;
  }
};
