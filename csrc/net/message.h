#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace hivemind::net {

// A read-only byte range plus whatever keeps it alive. Sending one never copies it in user space:
// the transport holds `owner` until ZeroMQ has written the bytes, so the bytes must not change
// until then (see docs/transport.md).
class Payload {
 public:
  Payload() = default;
  Payload(const void* data, size_t size, std::shared_ptr<const void> owner)
      : data_(static_cast<const uint8_t*>(data)), size_(size), owner_(std::move(owner)) {}

  // Takes ownership of a byte string (no copy).
  static Payload FromString(std::string bytes) {
    auto owned = std::make_shared<const std::string>(std::move(bytes));
    return Payload(owned->data(), owned->size(), owned);
  }
  // Copies `size` bytes into a new buffer.
  static Payload Copy(const void* data, size_t size) {
    return FromString(std::string(static_cast<const char*>(data), size));
  }
  // An uninitialized buffer of `size` bytes for the creator to fill through mutable_data() before
  // anyone else sees it.
  static Payload Allocate(size_t size) {
    std::shared_ptr<uint8_t[]> buffer(new uint8_t[size == 0 ? 1 : size]);
    return Payload(buffer.get(), size, std::shared_ptr<const void>(buffer, buffer.get()));
  }
  uint8_t* mutable_data() const { return const_cast<uint8_t*>(data_); }

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::shared_ptr<const void>& owner() const { return owner_; }
  std::string ToString() const { return std::string(reinterpret_cast<const char*>(data_), size_); }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::shared_ptr<const void> owner_;
};

// One RPC message: a small header (usually a serialized protobuf of the service) and any number of
// binary payloads (tensor bytes), which travel as separate frames and never pass through protobuf.
struct Message {
  std::string header;
  std::vector<Payload> payloads;

  Message() = default;
  explicit Message(std::string header_bytes) : header(std::move(header_bytes)) {}
  Message(std::string header_bytes, std::vector<Payload> payload_list)
      : header(std::move(header_bytes)), payloads(std::move(payload_list)) {}

  size_t PayloadBytes() const {
    size_t total = 0;
    for (const auto& p : payloads) total += p.size();
    return total;
  }
};

}  // namespace hivemind::net
