#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"
#include "net/peer_id.h"

namespace hivemind::net {

// A peer's long-term key pair. Ed25519 signs (DHT records); the same key mapped to X25519 encrypts
// and authenticates links (CURVE). Ephemeral unless saved to an identity file.
class Identity {
 public:
  // A fresh random key pair.
  static Identity Generate();
  // Derives the key pair from a 32-byte seed (tests and reproducible setups).
  static Identity FromSeed(const std::array<uint8_t, 32>& seed);
  // Reads an identity file written by Save. Refuses files that others can read (like ssh does).
  static Result<Identity> Load(const std::string& path);
  // Loads `path` if it exists, else generates a key pair and saves it there with mode 0600.
  static Result<Identity> LoadOrCreate(const std::string& path);
  // Writes the identity with mode 0600, atomically (temporary file + rename).
  Status Save(const std::string& path) const;

  const PeerId& peer_id() const { return peer_id_; }
  const std::array<uint8_t, 32>& curve_public_key() const { return curve_public_; }
  const std::array<uint8_t, 32>& curve_secret_key() const { return curve_secret_; }

  // Detached Ed25519 signature of `message`.
  std::string Sign(std::string_view message) const;
  static bool Verify(const PeerId& signer, std::string_view message, std::string_view signature);

 private:
  Identity() = default;
  std::array<uint8_t, 32> seed_{};
  std::array<uint8_t, 64> sign_secret_{};
  PeerId peer_id_;
  std::array<uint8_t, 32> curve_public_{};
  std::array<uint8_t, 32> curve_secret_{};
};

}  // namespace hivemind::net

namespace hivemind::net {
// libsodium must be initialized once per process before any key operation; cheap after the first
// call.
void EnsureSodiumInitialized();
}  // namespace hivemind::net
