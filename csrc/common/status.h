#pragma once

#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace hivemind {

// Error categories shared by every layer. Remote errors keep the code the remote handler chose.
enum class StatusCode {
  kOk = 0,
  kCancelled,           // the caller or the node gave up on the operation
  kInvalidArgument,     // malformed request, bad address, bad configuration
  kDeadlineExceeded,    // the operation's deadline passed
  kNotFound,            // unknown method, missing record or file
  kPermissionDenied,    // authentication or authorization failed
  kResourceExhausted,   // a size, count or memory limit was hit
  kFailedPrecondition,  // the operation is not valid in the current state
  kUnavailable,         // the peer is unreachable, disconnected or dead
  kInternal,            // a bug or an unexpected condition (for example a handler threw)
  kProtocolError,       // the peer sent something that violates the wire protocol
};

const char* StatusCodeName(StatusCode code);

class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "DEADLINE_EXCEEDED: call to peer ... timed out after 5000 ms"
  std::string ToString() const;
  // The same status with "context: " put before the message.
  Status WithContext(const std::string& context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Either a value or a non-OK status.
template <class T>
class Result {
 public:
  Result(T value) : data_(std::move(value)) {}  // NOLINT: implicit by design, like absl::StatusOr
  Result(Status status) : data_(std::move(status)) {}  // NOLINT

  bool ok() const { return std::holds_alternative<T>(data_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(data_);
  }
  T& value() & { return std::get<T>(data_); }
  const T& value() const& { return std::get<T>(data_); }
  T&& value() && { return std::get<T>(std::move(data_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> data_;
};

// Value type for operations that return nothing but may fail.
struct Empty {};

}  // namespace hivemind
