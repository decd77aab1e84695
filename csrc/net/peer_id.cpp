#include "net/peer_id.h"

#include <sodium.h>

#include <cstring>

#include "net/base58.h"
#include "net/identity.h"

namespace hivemind::net {

Result<PeerId> PeerId::FromBytes(std::string_view raw) {
  if (raw.size() != kSize) {
    return Status(StatusCode::kInvalidArgument, "a peer id is " + std::to_string(kSize) +
                                                    " bytes, got " + std::to_string(raw.size()));
  }
  Bytes bytes;
  std::memcpy(bytes.data(), raw.data(), kSize);
  return PeerId(bytes);
}

Result<PeerId> PeerId::FromString(std::string_view text) {
  auto decoded = Base58Decode(text);
  if (!decoded) {
    return Status(StatusCode::kInvalidArgument,
                  "peer id '" + std::string(text) + "' is not base58 text");
  }
  auto id = FromBytes(*decoded);
  if (!id.ok()) {
    return Status(StatusCode::kInvalidArgument, "peer id '" + std::string(text) + "' decodes to " +
                                                    std::to_string(decoded->size()) +
                                                    " bytes, expected " + std::to_string(kSize));
  }
  return id;
}

std::string PeerId::ToString() const { return Base58Encode(raw()); }

std::string PeerId::ShortString() const { return ToString().substr(0, 10) + "…"; }

bool PeerId::IsZero() const {
  for (auto byte : bytes_) {
    if (byte != 0) return false;
  }
  return true;
}

Result<std::array<uint8_t, 32>> PeerId::CurvePublicKey() const {
  EnsureSodiumInitialized();
  std::array<uint8_t, 32> curve{};
  if (crypto_sign_ed25519_pk_to_curve25519(curve.data(), bytes_.data()) != 0) {
    return Status(StatusCode::kInvalidArgument,
                  "peer id " + ToString() + " is not a valid Ed25519 public key");
  }
  return curve;
}

}  // namespace hivemind::net
