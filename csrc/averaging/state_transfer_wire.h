#pragma once

// Internal to state transfer (state_donor.cpp, state_download.cpp, state_directory.cpp): the
// byte-stream layout, checksums and manifest checks both ends must agree on. Includes protobuf, so
// it must never be included from a public header (those reach csrc/torch/).

#include <sodium.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "proto/state_transfer.pb.h"

namespace hivemind::averaging::state_wire {

constexpr size_t kChecksumBytes = 32;
// Bounds on a manifest received from another peer, far above any real state, so that counts and
// sizes can be trusted in arithmetic and allocations.
constexpr uint64_t kMinChunkBytes = 1024;
constexpr uint64_t kMaxChunkBytes = uint64_t{256} << 20;
constexpr int kMaxTensors = 1 << 20;
constexpr int kMaxDims = 64;

// Incremental BLAKE2b-256 (libsodium's crypto_generichash).
class Blake2b {
 public:
  Blake2b() { crypto_generichash_init(&state_, nullptr, 0, kChecksumBytes); }
  void Update(const void* data, size_t size) {
    crypto_generichash_update(&state_, static_cast<const unsigned char*>(data), size);
  }
  void UpdateU64(uint64_t value);               // 8 bytes, little-endian whatever the host
  void UpdateString(const std::string& bytes);  // length-prefixed
  std::string Final();

 private:
  crypto_generichash_state state_;
};

inline uint64_t ChunkCount(uint64_t total_bytes, uint64_t chunk_bytes) {
  return (total_bytes + chunk_bytes - 1) / chunk_bytes;
}

// The byte stream as consecutive segments (the metadata, then each tensor).
class ByteLayout {
 public:
  explicit ByteLayout(std::vector<uint64_t> sizes) : sizes_(std::move(sizes)) {
    for (uint64_t size : sizes_) total_ += size;
  }
  uint64_t total() const { return total_; }

  // Calls fn(segment index, offset in that segment, length) for each piece of
  // [offset, offset + length), in order, skipping empty segments.
  template <class Fn>
  void ForEachPiece(uint64_t offset, uint64_t length, Fn&& fn) const {
    uint64_t start = 0;
    for (size_t i = 0; i < sizes_.size() && length > 0; ++i) {
      uint64_t end = start + sizes_[i];
      if (offset < end && sizes_[i] > 0) {
        uint64_t inside = offset - start;
        uint64_t piece = std::min(length, sizes_[i] - inside);
        fn(i, inside, piece);
        offset += piece;
        length -= piece;
      }
      start = end;
    }
  }

 private:
  std::vector<uint64_t> sizes_;
  uint64_t total_ = 0;
};

// The digest of a manifest's content: BLAKE2b-256 over a canonical encoding of every field but
// `version` and `digest` (serialized protobuf is not canonical across implementations).
std::string ManifestDigest(const wire::StateManifest& manifest);

// Checks a manifest received from a donor: sizes add up, within `max_total_bytes`, chunk size and
// counts sane, one 32-byte checksum per chunk, and `digest` matches the content. INVALID_ARGUMENT
// for a manifest beyond our limits, PROTOCOL_ERROR for an inconsistent one.
Status ValidateManifest(const wire::StateManifest& manifest, uint64_t max_total_bytes);

// Base16 of the first bytes of a digest, for messages.
std::string ShortHex(const std::string& bytes);

}  // namespace hivemind::averaging::state_wire
