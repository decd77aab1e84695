// Socket I/O of direct streams (docs/transport.md): the frame format on their connections and
// blocking-with-deadline reads and writes over non-blocking sockets, so that another thread can
// end any wait at once with ::shutdown().
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"
#include "net/direct_cipher.h"
#include "net/message.h"
#include "proto/transport.pb.h"

namespace hivemind::net {

using DirectClock = std::chrono::steady_clock;

// The largest DirectFrame accepted for a node whose headers are at most `max_header_bytes`: the
// header, up to kMaxPayloadsPerMessage payload sizes, and room for the other fields.
size_t MaxDirectFrameBytes(size_t max_header_bytes);

// Writes `frame` ([u32 little-endian length][frame]) and then every payload's bytes, all of them,
// by `deadline`. kUnavailable when the connection fails, kDeadlineExceeded when it is too slow.
// With a `cipher`, as AEAD records instead: the length, the frame, then each payload in records of
// at most DirectCipher::kRecordBytes, each followed by its tag.
Status WriteDirectFrame(int fd, const wire::DirectFrame& frame,
                        const std::vector<Payload>& payloads, DirectClock::time_point deadline,
                        DirectCipher* cipher = nullptr);

// Told about the bytes of a payload as they arrive, while they are still in the reader's cache:
// runs of `size` bytes at `data`, in order, that start and end at multiples of kArrivalAlignment
// from the payload's start (except at its end).
using ArrivalObserver = std::function<void(const uint8_t* data, size_t size)>;
constexpr size_t kArrivalAlignment = 64;

// Reads `size` bytes into `data` by `deadline`. `*closed_before_any` (when given) says whether
// the peer closed the connection before the first byte: a clean end between frames.
Status ReadExactly(int fd, void* data, size_t size, DirectClock::time_point deadline,
                   bool* closed_before_any = nullptr, const ArrivalObserver* arrived = nullptr);

// Reads the next frame (not its payloads) by `deadline`; kResourceExhausted for a frame longer
// than `max_frame_bytes`, kProtocolError for one that does not parse.
Status ReadDirectFrame(int fd, size_t max_frame_bytes, DirectClock::time_point deadline,
                       wire::DirectFrame* frame, bool* closed_before_any = nullptr,
                       DirectCipher* cipher = nullptr);

// Reads one payload of `size` bytes that follows a frame into `data`; kPermissionDenied (with a
// `cipher`) for a record that does not open.
Status ReadDirectPayload(int fd, uint8_t* data, size_t size, DirectClock::time_point deadline,
                         DirectCipher* cipher = nullptr, const ArrivalObserver* arrived = nullptr);

// A non-blocking TCP connection to host:port (IPv4 or IPv6 literal) by `deadline`; the socket,
// or why not.
Result<int> ConnectDirect(const std::string& host, uint16_t port, DirectClock::time_point deadline);

}  // namespace hivemind::net
