#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>
#include <zmq.hpp>

#include "common/status.h"
#include "net/message.h"
#include "proto/transport.pb.h"

namespace hivemind::net {

constexpr uint32_t kProtocolVersion = 1;
constexpr uint32_t kMinCompatibleProtocolVersion = 1;
// A logical message may carry at most this many payloads (bounds allocations made for a header).
constexpr size_t kMaxPayloadsPerMessage = 4096;
// The largest chunk a sender may use; receivers size their ZeroMQ message limit for it.
constexpr size_t kMaxChunkBytes = size_t{16} << 20;

// A status on the wire and back; an unknown code reads as kInternal.
wire::ErrorStatus ToWire(const Status& status);
Status FromWire(const wire::ErrorStatus& error);

// The size limits a node enforces on every message it sends or accepts.
struct MessageLimits {
  size_t max_header_bytes;
  size_t max_message_bytes;
  // kResourceExhausted naming the limit when `message` is too large to send.
  Status Check(const Message& message) const;
};

// A frame that shares `payload`'s bytes: ZeroMQ releases the owner once it has written them.
zmq::message_t ZeroCopyFrame(const Payload& payload, size_t offset, size_t size);
zmq::message_t SerializeFrame(const wire::Envelope& envelope);

// One logical message on its way out, cut into ZeroMQ messages of at most `chunk_bytes` payload
// bytes.
class OutgoingMessage {
 public:
  OutgoingMessage(wire::Envelope envelope, std::vector<Payload> payloads, size_t chunk_bytes);

  bool done() const { return next_chunk_ >= chunk_count_; }
  bool next_chunk_has_payload() const { return total_bytes_ > 0; }
  // The frames of the next ZeroMQ message: an envelope, then zero-copy slices of the payloads.
  std::vector<zmq::message_t> NextChunk();

 private:
  wire::Envelope envelope_;
  std::vector<Payload> payloads_;
  size_t chunk_bytes_;
  size_t total_bytes_ = 0;
  uint32_t chunk_count_ = 1;
  uint32_t next_chunk_ = 0;
  size_t payload_index_ = 0;  // position of the next byte to send
  size_t payload_offset_ = 0;
};

// Puts a logical message back together from its ZeroMQ messages, checking every size against the
// limits and the envelope. Single-chunk messages adopt ZeroMQ's buffers without a copy.
class Reassembly {
 public:
  // Starts from the first ZeroMQ message; `frames[0]` is the envelope already parsed as `envelope`.
  static Result<Reassembly> Start(wire::Envelope envelope, std::vector<zmq::message_t>& frames,
                                  const MessageLimits& limits);

  // Adds a CONTINUATION message (`frames[0]` is its envelope).
  Status Continue(const wire::Envelope& continuation, std::vector<zmq::message_t>& frames);

  bool complete() const { return received_chunks_ >= chunk_count_; }
  const wire::Envelope& envelope() const { return envelope_; }
  size_t total_bytes() const { return total_bytes_; }
  // The assembled message; valid once complete().
  Message TakeMessage();

 private:
  Status CopyFrames(std::vector<zmq::message_t>& frames, bool last_chunk);

  wire::Envelope envelope_;
  std::vector<Payload> payloads_;
  size_t total_bytes_ = 0;
  size_t received_bytes_ = 0;
  uint32_t chunk_count_ = 1;
  uint32_t received_chunks_ = 0;
  size_t payload_index_ = 0;
  size_t payload_offset_ = 0;
};

}  // namespace hivemind::net
