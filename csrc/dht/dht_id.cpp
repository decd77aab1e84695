#include "dht/dht_id.h"

#include <sodium.h>

#include "net/identity.h"

namespace hivemind::dht {

namespace {

DhtId Blake2b160(const void* data, size_t size) {
  net::EnsureSodiumInitialized();
  DhtId::Bytes out;
  crypto_generichash(out.data(), out.size(), static_cast<const unsigned char*>(data), size, nullptr,
                     0);
  return DhtId(out);
}

}  // namespace

DhtId DhtId::OfPeer(const net::PeerId& peer) {
  return Blake2b160(peer.bytes().data(), peer.bytes().size());
}

DhtId DhtId::OfKey(std::string_view key) { return Blake2b160(key.data(), key.size()); }

Result<DhtId> DhtId::FromBytes(std::string_view raw) {
  if (raw.size() != kBytes) {
    return Status(StatusCode::kInvalidArgument, "a DHT id is " + std::to_string(kBytes) +
                                                    " bytes, got " + std::to_string(raw.size()));
  }
  Bytes bytes;
  std::memcpy(bytes.data(), raw.data(), kBytes);
  return DhtId(bytes);
}

DhtId DhtId::Random(std::mt19937_64& rng) {
  Bytes bytes;
  for (auto& byte : bytes) byte = static_cast<uint8_t>(rng());
  return DhtId(bytes);
}

DhtId DhtId::RandomWithPrefix(const DhtId& prefix, int depth, std::mt19937_64& rng) {
  DhtId id = Random(rng);
  for (int bit = 0; bit < depth && bit < kBits; ++bit) id = id.WithBit(bit, prefix.Bit(bit));
  return id;
}

std::string DhtId::ToHex() const {
  static const char kDigits[] = "0123456789abcdef";
  std::string text;
  text.reserve(kBytes * 2);
  for (uint8_t byte : bytes_) {
    text.push_back(kDigits[byte >> 4]);
    text.push_back(kDigits[byte & 15]);
  }
  return text;
}

DhtId DhtId::Xor(const DhtId& other) const {
  Bytes out;
  for (size_t i = 0; i < kBytes; ++i) out[i] = bytes_[i] ^ other.bytes_[i];
  return DhtId(out);
}

DhtId DhtId::WithBit(int index, bool value) const {
  Bytes out = bytes_;
  const uint8_t mask = static_cast<uint8_t>(1u << (7 - index % 8));
  if (value) {
    out[index / 8] |= mask;
  } else {
    out[index / 8] &= static_cast<uint8_t>(~mask);
  }
  return DhtId(out);
}

int DhtId::CommonPrefixBits(const DhtId& other) const {
  for (size_t i = 0; i < kBytes; ++i) {
    const uint8_t diff = bytes_[i] ^ other.bytes_[i];
    if (diff != 0) return static_cast<int>(i * 8) + __builtin_clz(diff) - 24;
  }
  return kBits;
}

}  // namespace hivemind::dht
