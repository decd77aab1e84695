#include "net/direct_io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "net/wire.h"

namespace hivemind::net {
namespace {

// With an ArrivalObserver, payloads are received in slices of this many bytes, so that the
// observer reads each one while it is still in the cache (a 1 MiB read would spill L2).
constexpr size_t kArrivalSlice = size_t{256} << 10;

Status Broken(const std::string& what) {
  return Status(StatusCode::kUnavailable, what + ": " + std::strerror(errno));
}

// Waits until `fd` is ready for `events`, the deadline passes, or the socket is shut down (then
// the next read or write reports it).
Status WaitReady(int fd, short events, DirectClock::time_point deadline) {
  while (true) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - DirectClock::now())
                    .count();
    if (left <= 0) return Status(StatusCode::kDeadlineExceeded, "the direct stream timed out");
    pollfd entry{fd, events, 0};
    int ready = ::poll(&entry, 1, static_cast<int>(std::min<long long>(left, INT_MAX)));
    if (ready > 0) return Status::Ok();
    if (ready < 0 && errno != EINTR) return Broken("poll");
  }
}

}  // namespace

size_t MaxDirectFrameBytes(size_t max_header_bytes) {
  return max_header_bytes + 11 * kMaxPayloadsPerMessage + 4096;
}

namespace {

// Sends every byte of `pieces` by `deadline`.
Status SendAll(int fd, std::vector<iovec> pieces, DirectClock::time_point deadline) {
  size_t next = 0;  // first piece not fully written
  while (next < pieces.size()) {
    msghdr message{};
    message.msg_iov = pieces.data() + next;
    message.msg_iovlen = std::min<size_t>(pieces.size() - next, IOV_MAX);
    ssize_t sent = ::sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return Broken("writing a direct stream");
      Status ready = WaitReady(fd, POLLOUT, deadline);
      if (!ready.ok()) return ready;
      continue;
    }
    auto left = static_cast<size_t>(sent);
    while (next < pieces.size() && left >= pieces[next].iov_len) left -= pieces[next++].iov_len;
    if (left > 0) {
      pieces[next].iov_base = static_cast<char*>(pieces[next].iov_base) + left;
      pieces[next].iov_len -= left;
    }
  }
  return Status::Ok();
}

// Appends `size` bytes of `data` sealed as one record (ciphertext, then tag) to `out`.
void AppendSealed(DirectCipher& cipher, const uint8_t* data, size_t size, std::string& out) {
  const size_t at = out.size();
  out.resize(at + size + DirectCipher::kTagBytes);
  auto* target = reinterpret_cast<uint8_t*>(out.data()) + at;
  cipher.Seal(data, size, target, target + size);
}

Status Unsealable() {
  return Status(StatusCode::kPermissionDenied,
                "a direct stream record did not authenticate (altered, replayed, or another key)");
}

// Reads one record of `size` bytes into `data` and opens it there.
Status ReadSealed(int fd, uint8_t* data, size_t size, DirectClock::time_point deadline,
                  DirectCipher& cipher, bool* closed_before_any = nullptr) {
  Status status = ReadExactly(fd, data, size, deadline, closed_before_any);
  uint8_t tag[DirectCipher::kTagBytes];
  if (status.ok()) status = ReadExactly(fd, tag, sizeof(tag), deadline);
  if (!status.ok()) return status;
  return cipher.Open(data, size, tag) ? Status::Ok() : Unsealable();
}

}  // namespace

Status WriteDirectFrame(int fd, const wire::DirectFrame& frame,
                        const std::vector<Payload>& payloads, DirectClock::time_point deadline,
                        DirectCipher* cipher) {
  std::string body;
  if (!frame.SerializeToString(&body)) {
    return Status(StatusCode::kInternal, "a direct frame did not serialize");
  }
  uint8_t length[4];
  const auto size = static_cast<uint32_t>(body.size());
  for (int i = 0; i < 4; ++i) length[i] = static_cast<uint8_t>((size >> (8 * i)) & 0xff);
  if (cipher == nullptr) {
    std::vector<iovec> pieces = {iovec{length, sizeof(length)}, iovec{body.data(), body.size()}};
    for (const Payload& payload : payloads) {
      if (payload.size() > 0) pieces.push_back(iovec{payload.mutable_data(), payload.size()});
    }
    return SendAll(fd, std::move(pieces), deadline);
  }
  std::string head;
  AppendSealed(*cipher, length, sizeof(length), head);
  AppendSealed(*cipher, reinterpret_cast<const uint8_t*>(body.data()), body.size(), head);
  Status status = SendAll(fd, {iovec{head.data(), head.size()}}, deadline);
  std::vector<uint8_t>& sealed = cipher->seal_buffer();
  for (const Payload& payload : payloads) {
    for (size_t at = 0; status.ok() && at < payload.size(); at += DirectCipher::kRecordBytes) {
      const size_t n = std::min(DirectCipher::kRecordBytes, payload.size() - at);
      sealed.resize(std::max(sealed.size(), n + DirectCipher::kTagBytes));
      cipher->Seal(payload.data() + at, n, sealed.data(), sealed.data() + n);
      status = SendAll(fd, {iovec{sealed.data(), n + DirectCipher::kTagBytes}}, deadline);
    }
  }
  return status;
}

Status ReadDirectPayload(int fd, uint8_t* data, size_t size, DirectClock::time_point deadline,
                         DirectCipher* cipher, const ArrivalObserver* arrived) {
  if (cipher == nullptr) return ReadExactly(fd, data, size, deadline, nullptr, arrived);
  static_assert(DirectCipher::kRecordBytes % kArrivalAlignment == 0);
  for (size_t at = 0; at < size; at += DirectCipher::kRecordBytes) {
    const size_t record = std::min(DirectCipher::kRecordBytes, size - at);
    Status status = ReadSealed(fd, data + at, record, deadline, *cipher);
    if (!status.ok()) return status;
    if (arrived != nullptr) (*arrived)(data + at, record);  // only once it authenticated
  }
  return Status::Ok();
}

Status ReadExactly(int fd, void* data, size_t size, DirectClock::time_point deadline,
                   bool* closed_before_any, const ArrivalObserver* arrived) {
  if (closed_before_any != nullptr) *closed_before_any = false;
  auto* at = static_cast<char*>(data);
  size_t done = 0;
  size_t reported = 0;  // bytes passed to `arrived`
  while (done < size) {
    const size_t want = arrived != nullptr ? std::min(size - done, kArrivalSlice) : size - done;
    ssize_t got = ::recv(fd, at + done, want, MSG_DONTWAIT);
    if (got > 0) {
      done += static_cast<size_t>(got);
      if (arrived != nullptr) {
        const size_t upto = done == size ? size : done - done % kArrivalAlignment;
        if (upto > reported) {
          (*arrived)(reinterpret_cast<const uint8_t*>(at) + reported, upto - reported);
          reported = upto;
        }
      }
      continue;
    }
    if (got == 0) {
      if (closed_before_any != nullptr) *closed_before_any = done == 0;
      return Status(StatusCode::kUnavailable, "the peer closed the direct connection");
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return Broken("reading a direct stream");
    Status ready = WaitReady(fd, POLLIN, deadline);
    if (!ready.ok()) return ready;
  }
  return Status::Ok();
}

Status ReadDirectFrame(int fd, size_t max_frame_bytes, DirectClock::time_point deadline,
                       wire::DirectFrame* frame, bool* closed_before_any, DirectCipher* cipher) {
  unsigned char head[4];
  Status status = cipher == nullptr
                      ? ReadExactly(fd, head, sizeof(head), deadline, closed_before_any)
                      : ReadSealed(fd, head, sizeof(head), deadline, *cipher, closed_before_any);
  if (!status.ok()) return status;
  const uint32_t size = static_cast<uint32_t>(head[0]) | (static_cast<uint32_t>(head[1]) << 8) |
                        (static_cast<uint32_t>(head[2]) << 16) |
                        (static_cast<uint32_t>(head[3]) << 24);
  if (size > max_frame_bytes) {
    // Only a header above max_header_bytes makes a frame this long.
    return Status(StatusCode::kResourceExhausted,
                  "a direct frame of " + std::to_string(size) + " bytes (at most " +
                      std::to_string(max_frame_bytes) + " for this node's max_header_bytes)");
  }
  std::string bytes(size, '\0');
  auto* data = reinterpret_cast<uint8_t*>(bytes.data());
  status = cipher == nullptr ? ReadExactly(fd, data, size, deadline)
                             : ReadSealed(fd, data, size, deadline, *cipher);
  if (!status.ok()) return status;
  if (!frame->ParseFromString(bytes)) {
    return Status(StatusCode::kProtocolError, "a direct frame that does not parse");
  }
  return Status::Ok();
}

Result<int> ConnectDirect(const std::string& host, uint16_t port,
                          DirectClock::time_point deadline) {
  sockaddr_storage address{};
  socklen_t length = 0;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&address);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&address);
  if (::inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    length = sizeof(sockaddr_in);
  } else if (::inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    length = sizeof(sockaddr_in6);
  } else {
    return Status(StatusCode::kInvalidArgument, "not an IP address: " + host);
  }
  int fd = ::socket(address.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Broken("socket");
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), length) != 0 && errno != EINPROGRESS) {
    Status failed = Broken("connecting to " + host + ":" + std::to_string(port));
    ::close(fd);
    return failed;
  }
  Status ready = WaitReady(fd, POLLOUT, deadline);
  int error = 0;
  socklen_t error_length = sizeof(error);
  if (ready.ok() && ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &error_length) == 0 &&
      error != 0) {
    ready = Status(StatusCode::kUnavailable, "connecting to " + host + ":" + std::to_string(port) +
                                                 ": " + std::strerror(error));
  }
  if (!ready.ok()) {
    ::close(fd);
    return ready;
  }
  return fd;
}

}  // namespace hivemind::net
