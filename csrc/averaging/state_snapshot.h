#pragma once

// The state a peer shares with newcomers (docs/state_transfer.md): opaque metadata bytes (epoch,
// optimizer hyper-parameters, anything the trainer serializes) and an ordered list of named tensors
// given as raw bytes. This layer is torch-free: a tensor's dtype and shape are carried for the
// receiver, never interpreted by the transfer.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "net/message.h"

namespace hivemind::averaging {

struct StateTensor {
  std::string name;
  std::string dtype;  // e.g. "float32"; opaque to the transfer
  std::vector<int64_t> shape;
  // The bytes, with shared ownership. Once published they must never change: downloads in
  // progress send them zero-copy (docs/transport.md, Payload).
  net::Payload data;

  // A tensor holding its own copy of `size` bytes at `bytes`, so the trainer may keep writing to
  // its buffer right after this returns.
  static StateTensor Copy(std::string name, std::string dtype, std::vector<int64_t> shape,
                          const void* bytes, size_t size) {
    return StateTensor{std::move(name), std::move(dtype), std::move(shape),
                       net::Payload::Copy(bytes, size)};
  }
};

struct StateSnapshot {
  std::string metadata;
  std::vector<StateTensor> tensors;

  // Bytes in the transfer's byte stream: the metadata followed by every tensor.
  uint64_t TotalBytes() const {
    uint64_t total = metadata.size();
    for (const auto& tensor : tensors) total += tensor.data.size();
    return total;
  }
};

}  // namespace hivemind::averaging
