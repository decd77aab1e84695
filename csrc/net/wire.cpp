#include "net/wire.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

namespace hivemind::net {
namespace {

void ReleaseOwner(void* /*data*/, void* hint) {
  delete static_cast<std::shared_ptr<const void>*>(hint);
}

Status Violation(const std::string& why) { return Status(StatusCode::kProtocolError, why); }

}  // namespace

wire::ErrorStatus ToWire(const Status& status) {
  wire::ErrorStatus error;
  error.set_code(static_cast<uint32_t>(status.code()));
  error.set_message(status.message());
  return error;
}

Status FromWire(const wire::ErrorStatus& error) {
  if (error.code() == 0) return Status::Ok();
  auto code = error.code() <= static_cast<uint32_t>(StatusCode::kProtocolError)
                  ? static_cast<StatusCode>(error.code())
                  : StatusCode::kInternal;
  return Status(code, error.message());
}

Status MessageLimits::Check(const Message& message) const {
  if (message.header.size() > max_header_bytes) {
    return Status(StatusCode::kResourceExhausted,
                  "message header of " + std::to_string(message.header.size()) +
                      " bytes exceeds max_header_bytes (" + std::to_string(max_header_bytes) + ")");
  }
  if (message.payloads.size() > kMaxPayloadsPerMessage) {
    return Status(
        StatusCode::kResourceExhausted,
        "a message may carry at most " + std::to_string(kMaxPayloadsPerMessage) + " payloads");
  }
  size_t total = message.header.size() + message.PayloadBytes();
  if (total > max_message_bytes) {
    return Status(StatusCode::kResourceExhausted, "message of " + std::to_string(total) +
                                                      " bytes exceeds max_message_bytes (" +
                                                      std::to_string(max_message_bytes) + ")");
  }
  return Status::Ok();
}

zmq::message_t ZeroCopyFrame(const Payload& payload, size_t offset, size_t size) {
  auto* owner = new std::shared_ptr<const void>(payload.owner());
  return zmq::message_t(const_cast<uint8_t*>(payload.data()) + offset, size, &ReleaseOwner, owner);
}

zmq::message_t SerializeFrame(const wire::Envelope& envelope) {
  zmq::message_t frame(envelope.ByteSizeLong());
  envelope.SerializeToArray(frame.data(), static_cast<int>(frame.size()));
  return frame;
}

OutgoingMessage::OutgoingMessage(wire::Envelope envelope, std::vector<Payload> payloads,
                                 size_t chunk_bytes)
    : envelope_(std::move(envelope)), payloads_(std::move(payloads)), chunk_bytes_(chunk_bytes) {
  envelope_.clear_payload_sizes();
  for (const auto& payload : payloads_) {
    envelope_.add_payload_sizes(payload.size());
    total_bytes_ += payload.size();
  }
  chunk_count_ =
      static_cast<uint32_t>(std::max<size_t>(1, (total_bytes_ + chunk_bytes_ - 1) / chunk_bytes_));
  envelope_.set_chunk_count(chunk_count_);
}

std::vector<zmq::message_t> OutgoingMessage::NextChunk() {
  std::vector<zmq::message_t> frames;
  if (next_chunk_ == 0) {
    frames.push_back(SerializeFrame(envelope_));
  } else {
    wire::Envelope continuation;
    continuation.set_kind(wire::CONTINUATION);
    continuation.set_call_id(envelope_.call_id());
    continuation.set_from_caller(envelope_.from_caller());
    continuation.set_chunk_index(next_chunk_);
    frames.push_back(SerializeFrame(continuation));
  }
  size_t budget = chunk_bytes_;
  while (budget > 0 && payload_index_ < payloads_.size()) {
    const Payload& payload = payloads_[payload_index_];
    size_t take = std::min(budget, payload.size() - payload_offset_);
    if (take > 0) frames.push_back(ZeroCopyFrame(payload, payload_offset_, take));
    budget -= take;
    payload_offset_ += take;
    if (payload_offset_ == payload.size()) {
      ++payload_index_;
      payload_offset_ = 0;
    }
  }
  ++next_chunk_;
  if (done()) payloads_.clear();  // the frames keep their own references
  return frames;
}

Result<Reassembly> Reassembly::Start(wire::Envelope envelope, std::vector<zmq::message_t>& frames,
                                     const MessageLimits& limits) {
  const size_t max_message_bytes = limits.max_message_bytes;
  Reassembly assembly;
  if (envelope.header().size() > limits.max_header_bytes) {
    return Status(StatusCode::kResourceExhausted,
                  "message header of " + std::to_string(envelope.header().size()) +
                      " bytes exceeds this node's max_header_bytes (" +
                      std::to_string(limits.max_header_bytes) + ")");
  }
  if (envelope.payload_sizes_size() > static_cast<int>(kMaxPayloadsPerMessage)) {
    return Status(StatusCode::kResourceExhausted,
                  "message has " + std::to_string(envelope.payload_sizes_size()) +
                      " payloads, more than the limit of " +
                      std::to_string(kMaxPayloadsPerMessage));
  }
  size_t total = envelope.header().size();
  for (uint64_t size : envelope.payload_sizes()) {
    if (size > max_message_bytes || total + size > max_message_bytes) {
      return Status(StatusCode::kResourceExhausted,
                    "message of more than " + std::to_string(max_message_bytes) +
                        " bytes exceeds this node's max_message_bytes");
    }
    total += size;
    assembly.total_bytes_ += size;
  }
  assembly.chunk_count_ = std::max<uint32_t>(1, envelope.chunk_count());
  if (assembly.chunk_count_ > 1 && assembly.chunk_count_ > assembly.total_bytes_) {
    return Violation("message declares " + std::to_string(assembly.chunk_count_) +
                     " chunks for only " + std::to_string(assembly.total_bytes_) + " bytes");
  }
  assembly.envelope_ = std::move(envelope);

  // The common case: one chunk whose frames are exactly the non-empty payloads. Adopt them.
  if (assembly.chunk_count_ == 1) {
    size_t frame = 1;
    bool matches = true;
    for (uint64_t size : assembly.envelope_.payload_sizes()) {
      if (size == 0) continue;
      if (frame >= frames.size() || frames[frame].size() != size) {
        matches = false;
        break;
      }
      ++frame;
    }
    if (matches && frame == frames.size()) {
      frame = 1;
      for (uint64_t size : assembly.envelope_.payload_sizes()) {
        if (size == 0) {
          assembly.payloads_.emplace_back();
          continue;
        }
        auto owned = std::make_shared<zmq::message_t>(std::move(frames[frame++]));
        assembly.payloads_.emplace_back(owned->data(), owned->size(), owned);
      }
      assembly.received_chunks_ = 1;
      assembly.received_bytes_ = assembly.total_bytes_;
      return assembly;
    }
  }
  for (uint64_t size : assembly.envelope_.payload_sizes()) {
    assembly.payloads_.push_back(size == 0 ? Payload() : Payload::Allocate(size));
  }
  Status copied = assembly.CopyFrames(frames, assembly.chunk_count_ == 1);
  if (!copied.ok()) return copied;
  return assembly;
}

Status Reassembly::Continue(const wire::Envelope& continuation,
                            std::vector<zmq::message_t>& frames) {
  if (complete()) return Violation("continuation after the last chunk of a message");
  if (continuation.chunk_index() != received_chunks_) {
    return Violation("chunk " + std::to_string(continuation.chunk_index()) + " arrived, expected " +
                     std::to_string(received_chunks_));
  }
  return CopyFrames(frames, received_chunks_ + 1 == chunk_count_);
}

Status Reassembly::CopyFrames(std::vector<zmq::message_t>& frames, bool last_chunk) {
  size_t chunk_bytes = 0;
  for (size_t i = 1; i < frames.size(); ++i) {
    const auto* source = static_cast<const uint8_t*>(frames[i].data());
    size_t left = frames[i].size();
    chunk_bytes += left;
    if (received_bytes_ + left > total_bytes_) {
      return Violation("a message carries more payload bytes than its header declares (" +
                       std::to_string(total_bytes_) + ")");
    }
    while (left > 0) {
      while (payloads_[payload_index_].size() == payload_offset_) {
        ++payload_index_;
        payload_offset_ = 0;
      }
      Payload& payload = payloads_[payload_index_];
      size_t take = std::min(left, payload.size() - payload_offset_);
      std::memcpy(payload.mutable_data() + payload_offset_, source, take);
      source += take;
      left -= take;
      payload_offset_ += take;
      received_bytes_ += take;
    }
  }
  if (chunk_count_ > 1 && chunk_bytes == 0) return Violation("an empty chunk in a chunked message");
  ++received_chunks_;
  if (last_chunk && received_bytes_ != total_bytes_) {
    return Violation("a message ended after " + std::to_string(received_bytes_) + " of " +
                     std::to_string(total_bytes_) + " declared payload bytes");
  }
  return Status::Ok();
}

Message Reassembly::TakeMessage() {
  Message message;
  message.header = std::move(*envelope_.mutable_header());
  message.payloads = std::move(payloads_);
  return message;
}

}  // namespace hivemind::net
