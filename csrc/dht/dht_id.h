#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <string_view>

#include "common/status.h"
#include "net/peer_id.h"

namespace hivemind::dht {

// A point of the DHT's 160-bit key space. Nodes sit at the hash of their peer id (so nobody can
// pick where they land without grinding keys), records at the hash of their key. Distances are XOR,
// read as a big-endian 160-bit number, so bit 0 is the most significant bit.
class DhtId {
 public:
  static constexpr size_t kBytes = 20;
  static constexpr int kBits = 160;
  using Bytes = std::array<uint8_t, kBytes>;

  DhtId() { bytes_.fill(0); }
  explicit DhtId(const Bytes& bytes) : bytes_(bytes) {}

  // BLAKE2b-160 of the peer's Ed25519 public key.
  static DhtId OfPeer(const net::PeerId& peer);
  // BLAKE2b-160 of a record key (any bytes). Remote nodes only ever see this hash.
  static DhtId OfKey(std::string_view key);
  // Parses the 20 raw bytes of an id received from the network.
  static Result<DhtId> FromBytes(std::string_view raw);
  static DhtId Random(std::mt19937_64& rng);
  // A random id that shares the first `depth` bits with `prefix` (a target inside one k-bucket).
  static DhtId RandomWithPrefix(const DhtId& prefix, int depth, std::mt19937_64& rng);

  const Bytes& bytes() const { return bytes_; }
  std::string_view raw() const {
    return std::string_view(reinterpret_cast<const char*>(bytes_.data()), bytes_.size());
  }
  std::string ToHex() const;
  std::string ShortString() const { return ToHex().substr(0, 8); }

  DhtId Xor(const DhtId& other) const;
  // Bit `index` counted from the most significant one.
  bool Bit(int index) const { return (bytes_[index / 8] >> (7 - index % 8)) & 1; }
  DhtId WithBit(int index, bool value) const;
  // Number of leading bits equal in both ids (160 when they are the same id).
  int CommonPrefixBits(const DhtId& other) const;

  bool operator==(const DhtId& other) const { return bytes_ == other.bytes_; }
  bool operator!=(const DhtId& other) const { return bytes_ != other.bytes_; }
  // Numeric order, which on XOR distances is "nearer first".
  bool operator<(const DhtId& other) const { return bytes_ < other.bytes_; }

 private:
  Bytes bytes_;
};

// True when `a` is strictly nearer to `target` than `b` in the XOR metric.
inline bool IsNearer(const DhtId& target, const DhtId& a, const DhtId& b) {
  return a.Xor(target) < b.Xor(target);
}

}  // namespace hivemind::dht

template <>
struct std::hash<hivemind::dht::DhtId> {
  size_t operator()(const hivemind::dht::DhtId& id) const {
    size_t h;
    std::memcpy(&h, id.bytes().data(), sizeof(h));  // the bytes are already a uniform hash
    return h;
  }
};
