// The AEAD of direct streams between nodes with encryption (docs/transport.md): a fresh 32-byte
// key per stream, chosen by the callee and sent in its offer over the CURVE-encrypted link, and
// records sealed with AES-256-GCM when both CPUs run it (libsodium needs AES-NI), else
// ChaCha20-Poly1305. Nonces count the records of each direction from zero (the direction is part
// of the nonce), so no nonce repeats under a key, and a record altered, dropped, replayed or
// reordered fails to open. The point is speed: CURVE's XSalsa20-Poly1305 runs on the node's one
// ZeroMQ I/O thread; these ciphers are faster and run on each stream's own threads.
#pragma once

#include <sodium.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "proto/transport.pb.h"

namespace hivemind::net {

class DirectCipher {
 public:
  static constexpr size_t kKeyBytes = 32;
  static constexpr size_t kTagBytes = 16;
  // Payloads are sealed in records of at most this many bytes.
  static constexpr size_t kRecordBytes = size_t{1} << 20;

  // Whether this CPU runs libsodium's AES-256-GCM.
  static bool AesAvailable();
  // The cipher for a stream between this node and one whose CPU does (or not) run AES-256-GCM.
  static wire::DirectCipherKind Choose(bool peer_runs_aes);
  static std::string NewKey();

  // `caller`: which end of the stream this is (the two ends seal with different nonces).
  DirectCipher(wire::DirectCipherKind kind, const std::string& key, bool caller);
  ~DirectCipher();
  DirectCipher(const DirectCipher&) = delete;
  DirectCipher& operator=(const DirectCipher&) = delete;

  // Seals `size` bytes of `in` into `out` (may be `in`) and writes the tag to `tag`.
  void Seal(const uint8_t* in, size_t size, uint8_t* out, uint8_t* tag);
  // Opens a record in place; false if it was not the next record sealed by the other end under
  // this key.
  bool Open(uint8_t* data, size_t size, const uint8_t* tag);

  // The writer's buffer for sealed records (only the writer seals).
  std::vector<uint8_t>& seal_buffer() { return seal_buffer_; }

 private:
  void Nonce(bool sending, uint8_t* nonce);

  const wire::DirectCipherKind kind_;
  const bool caller_;
  uint8_t key_[kKeyBytes];
  crypto_aead_aes256gcm_state aes_;  // expanded key, when kind_ is AES
  uint64_t sealed_ = 0;
  uint64_t opened_ = 0;
  std::vector<uint8_t> seal_buffer_;
};

}  // namespace hivemind::net
