#include "averaging/state_transfer_wire.h"

#include <limits>

namespace hivemind::averaging::state_wire {

void Blake2b::UpdateU64(uint64_t value) {
  unsigned char bytes[8];
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>(value >> (8 * i));
  Update(bytes, sizeof(bytes));
}

void Blake2b::UpdateString(const std::string& bytes) {
  UpdateU64(bytes.size());
  Update(bytes.data(), bytes.size());
}

std::string Blake2b::Final() {
  std::string out(kChecksumBytes, '\0');
  crypto_generichash_final(&state_, reinterpret_cast<unsigned char*>(out.data()), out.size());
  return out;
}

std::string ManifestDigest(const wire::StateManifest& manifest) {
  Blake2b hash;
  hash.UpdateString("hivemind-state-manifest-v1");
  hash.UpdateU64(manifest.metadata_size());
  hash.UpdateU64(static_cast<uint64_t>(manifest.tensors_size()));
  for (const auto& tensor : manifest.tensors()) {
    hash.UpdateString(tensor.name());
    hash.UpdateString(tensor.dtype());
    hash.UpdateU64(static_cast<uint64_t>(tensor.shape_size()));
    for (int64_t dim : tensor.shape()) hash.UpdateU64(static_cast<uint64_t>(dim));
    hash.UpdateU64(tensor.size_bytes());
  }
  hash.UpdateU64(manifest.total_bytes());
  hash.UpdateU64(manifest.chunk_bytes());
  hash.UpdateU64(static_cast<uint64_t>(manifest.chunk_checksums_size()));
  for (const auto& checksum : manifest.chunk_checksums()) hash.UpdateString(checksum);
  return hash.Final();
}

Status ValidateManifest(const wire::StateManifest& manifest, uint64_t max_total_bytes) {
  auto protocol_error = [](const std::string& what) {
    return Status(StatusCode::kProtocolError, "bad state manifest: " + what);
  };
  if (manifest.version() == 0) return protocol_error("version 0");
  if (manifest.tensors_size() > kMaxTensors) {
    return protocol_error(std::to_string(manifest.tensors_size()) + " tensors");
  }
  if (manifest.chunk_bytes() < kMinChunkBytes || manifest.chunk_bytes() > kMaxChunkBytes) {
    return protocol_error("chunk size " + std::to_string(manifest.chunk_bytes()) + " outside [" +
                          std::to_string(kMinChunkBytes) + ", " + std::to_string(kMaxChunkBytes) +
                          "]");
  }
  // Each term is checked against the cap before adding, so the sum cannot overflow.
  uint64_t sum = 0;
  auto add = [&](uint64_t size) {
    if (size > max_total_bytes || sum > max_total_bytes - size) return false;
    sum += size;
    return true;
  };
  bool within = add(manifest.metadata_size());
  for (const auto& tensor : manifest.tensors()) {
    if (tensor.shape_size() > kMaxDims) {
      return protocol_error("tensor '" + tensor.name() + "' has " +
                            std::to_string(tensor.shape_size()) + " dimensions");
    }
    for (int64_t dim : tensor.shape()) {
      if (dim < 0) return protocol_error("tensor '" + tensor.name() + "' has a negative dimension");
    }
    within = within && add(tensor.size_bytes());
  }
  if (!within) {
    return Status(StatusCode::kInvalidArgument,
                  "the donor's state is larger than max_total_bytes (" +
                      std::to_string(max_total_bytes) + ")");
  }
  if (sum != manifest.total_bytes()) {
    return protocol_error("total_bytes " + std::to_string(manifest.total_bytes()) +
                          " but the parts add up to " + std::to_string(sum));
  }
  uint64_t chunks = ChunkCount(sum, manifest.chunk_bytes());
  if (static_cast<uint64_t>(manifest.chunk_checksums_size()) != chunks) {
    return protocol_error(std::to_string(manifest.chunk_checksums_size()) + " checksums for " +
                          std::to_string(chunks) + " chunks");
  }
  for (const auto& checksum : manifest.chunk_checksums()) {
    if (checksum.size() != kChecksumBytes) return protocol_error("a checksum is not 32 bytes");
  }
  if (manifest.digest() != ManifestDigest(manifest)) {
    return protocol_error("the digest does not match the manifest's content");
  }
  return Status::Ok();
}

std::string ShortHex(const std::string& bytes) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < bytes.size() && i < 6; ++i) {
    auto byte = static_cast<unsigned char>(bytes[i]);
    out += kDigits[byte >> 4];
    out += kDigits[byte & 15];
  }
  return out;
}

}  // namespace hivemind::averaging::state_wire
