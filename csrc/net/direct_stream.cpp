#include "net/direct_stream.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

#include "net/direct_io.h"

namespace hivemind::net {
namespace {

// How long a failing side waits to tell the peer why before it shuts the connection down.
constexpr auto kFarewellTimeout = std::chrono::seconds(1);

}  // namespace

DirectStream::DirectStream(PeerId peer, Settings settings, std::shared_ptr<ThreadSet> threads)
    : peer_(std::move(peer)), settings_(std::move(settings)), threads_(std::move(threads)) {}

DirectStream::~DirectStream() {
  if (fd_ >= 0) ::close(fd_);
}

void DirectStream::SetSetupCanceller(std::function<void()> cancel) {
  bool failed;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    failed = failed_.has_value();
    if (!failed) setup_canceller_ = std::move(cancel);
  }
  if (failed) cancel();
}

bool DirectStream::SetReceivePlacer(std::shared_ptr<const ReceivePlacer> placer) {
  std::lock_guard<std::mutex> lock(mutex_);
  placer_ = std::move(placer);
  return true;
}

std::shared_ptr<Stream> DirectStream::fallback() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return fallback_;
}

bool DirectStream::Start(int fd, std::shared_ptr<DirectCipher> cipher) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    setup_canceller_ = nullptr;
    if (failed_) {
      ::close(fd);
      return false;
    }
    fd_ = fd;
    cipher_ = std::move(cipher);
    started_ = true;
    threads_running_ = 2;
  }
  auto self = shared_from_this();
  if (!threads_->Spawn([self] { self->RunWriter(); })) {
    ThreadEnded();
    ThreadEnded();
    Fail(Status(StatusCode::kCancelled, "the node is shut down"));
    return false;
  }
  if (!threads_->Spawn([self] { self->RunReader(); })) {
    ThreadEnded();
    Fail(Status(StatusCode::kCancelled, "the node is shut down"));
    return false;
  }
  return true;
}

void DirectStream::Divert(std::shared_ptr<Stream> fallback) {
  std::deque<std::pair<Message, Promise<Empty>>> writes;
  std::deque<Promise<std::optional<Message>>> reads;
  bool close = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    setup_canceller_ = nullptr;
    if (failed_) {
      fallback->Cancel();
      return;
    }
    fallback_ = fallback;
    writes.swap(pending_writes_);
    reads.swap(pending_reads_);
    close = close_status_.has_value();
  }
  // In their original order: the fallback keeps the order of writes and of reads.
  for (auto& [message, promise] : writes) {
    fallback->Write(std::move(message)).OnReady([promise = promise](const Result<Empty>& result) {
      promise.Set(result);
    });
  }
  for (auto& promise : reads) {
    fallback->Read().OnReady(
        [promise](const Result<std::optional<Message>>& result) { promise.Set(result); });
  }
  if (close) fallback->CloseWrite();
}

Future<Empty> DirectStream::Write(Message message) {
  if (auto other = fallback()) return other->Write(std::move(message));
  Status size = settings_.limits.Check(message);
  if (!size.ok()) return Future<Empty>::Ready(size);
  Promise<Empty> promise;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (fallback_) return fallback_->Write(std::move(message));
    if (write_end_) return Future<Empty>::Ready(*write_end_);
    if (close_status_) {
      return Future<Empty>::Ready(
          Status(StatusCode::kFailedPrecondition, "write after CloseWrite on this stream"));
    }
    pending_writes_.emplace_back(std::move(message), promise);
  }
  writer_cv_.notify_one();
  return promise.future();
}

void DirectStream::CloseWrite() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!fallback_) {
      if (!write_end_ && !close_status_) close_status_ = Status::Ok();
    }
  }
  if (auto other = fallback()) {
    other->CloseWrite();
    return;
  }
  writer_cv_.notify_one();
}

void DirectStream::FinishFromHandler(const Status& status) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    discard_reads_ = true;
    inbox_.clear();
    if (!write_end_ && !close_status_) close_status_ = status;
  }
  writer_cv_.notify_one();
  reader_cv_.notify_one();
}

Future<std::optional<Message>> DirectStream::Read() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (fallback_) {
    auto other = fallback_;
    lock.unlock();
    return other->Read();
  }
  if (!inbox_.empty()) {
    Message message = std::move(inbox_.front());
    inbox_.pop_front();
    lock.unlock();
    reader_cv_.notify_one();  // room for the next message
    return Future<std::optional<Message>>::Ready(std::optional<Message>(std::move(message)));
  }
  if (read_end_) {
    if (read_end_->ok()) return Future<std::optional<Message>>::Ready(std::optional<Message>());
    return Future<std::optional<Message>>::Ready(*read_end_);
  }
  pending_reads_.emplace_back();
  return pending_reads_.back().future();
}

void DirectStream::Cancel() {
  if (auto other = fallback()) {
    other->Cancel();
    return;
  }
  Fail(Status(StatusCode::kCancelled, "the stream was cancelled by this side"));
}

bool DirectStream::Fail(const Status& status, bool tell_peer) {
  std::deque<Promise<std::optional<Message>>> reads;
  std::deque<std::pair<Message, Promise<Empty>>> writes;
  std::function<void()> canceller;
  int fd = -1;
  bool tell = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_ || fallback_) return false;
    failed_ = status;
    cancelled_->store(true);
    // Messages that arrived before a clean end stay readable; otherwise reads fail now.
    if (!read_end_) {
      read_end_ = status;
      inbox_.clear();
    }
    if (!write_end_) write_end_ = status;
    reads.swap(pending_reads_);
    writes.swap(pending_writes_);
    canceller.swap(setup_canceller_);
    fd = fd_;
    // A writer between messages says why (its thread then shuts the connection down); one in
    // the middle of a message cannot, and the peer sees the connection end.
    tell = tell_peer && started_ && threads_running_ > 0 && !writing_ && !close_sent_;
    tell_peer_ = tell;
  }
  if (canceller) canceller();
  if (!tell && fd >= 0) ::shutdown(fd, SHUT_RDWR);
  writer_cv_.notify_all();
  reader_cv_.notify_all();
  for (auto& read : reads) read.Set(status);
  for (auto& write : writes) write.second.Set(status);
  return true;
}

std::optional<DirectStream::Outgoing> DirectStream::NextOutgoing() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    writing_ = false;
    if (failed_) {
      if (!tell_peer_ || close_sent_) return std::nullopt;
      close_sent_ = true;
      writing_ = true;
      Outgoing farewell;
      farewell.close = *failed_;
      return farewell;
    }
    if (!pending_writes_.empty()) {
      Outgoing next;
      next.message = std::move(pending_writes_.front().first);
      next.promise = pending_writes_.front().second;
      pending_writes_.pop_front();
      writing_ = true;
      return next;
    }
    if (close_sent_) return std::nullopt;
    if (write_end_) {
      // The serving side finished first: say this side is done too, so that the connection ends
      // between frames both ways and can carry the next stream.
      if (!settings_.we_called || !close_read_) return std::nullopt;
      close_sent_ = true;
      writing_ = true;
      Outgoing close;
      close.close = Status::Ok();
      return close;
    }
    if (close_status_) {
      close_sent_ = true;
      writing_ = true;
      Outgoing close;
      close.close = *close_status_;
      return close;
    }
    if (writer_cv_.wait_until(lock, settings_.deadline) == std::cv_status::timeout &&
        DirectClock::now() >= settings_.deadline && pending_writes_.empty() && !failed_ &&
        !close_status_ && !write_end_) {
      lock.unlock();
      Fail(Status(StatusCode::kDeadlineExceeded, "the direct stream reached its deadline"));
      lock.lock();
    }
  }
}

void DirectStream::RunWriter() {
  while (auto next = NextOutgoing()) {
    wire::DirectFrame frame;
    if (next->message) {
      frame.set_kind(wire::DIRECT_DATA);
      frame.set_header(std::move(next->message->header));
      for (const Payload& payload : next->message->payloads)
        frame.add_payload_sizes(payload.size());
      Status sent =
          WriteDirectFrame(fd_, frame, next->message->payloads, settings_.deadline, cipher_.get());
      next->message.reset();  // the payloads may be released now
      if (sent.ok()) {
        next->promise.Set(Empty{});
      } else {
        Fail(sent);
        next->promise.Set(sent);
      }
      continue;
    }
    frame.set_kind(wire::DIRECT_CLOSE);
    *frame.mutable_status() = ToWire(*next->close);
    bool farewell;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      farewell = failed_.has_value();
    }
    auto deadline = farewell ? std::min(settings_.deadline, DirectClock::now() + kFarewellTimeout)
                             : settings_.deadline;
    Status sent = WriteDirectFrame(fd_, frame, {}, deadline, cipher_.get());
    if (farewell) {
      ::shutdown(fd_, SHUT_RDWR);
    } else if (!sent.ok()) {
      Fail(sent);
    } else if (next->close->ok()) {
      std::lock_guard<std::mutex> lock(mutex_);
      close_written_ = true;
    }
  }
  ThreadEnded();
}

void DirectStream::Deliver(Message message) {
  Promise<std::optional<Message>> reader;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (read_end_ || discard_reads_) return;
    if (pending_reads_.empty()) {
      inbox_.push_back(std::move(message));
      return;
    }
    reader = std::move(pending_reads_.front());
    pending_reads_.pop_front();
  }
  reader.Set(std::optional<Message>(std::move(message)));
}

void DirectStream::OnRemoteClose(const Status& status) {
  std::deque<Promise<std::optional<Message>>> reads;
  std::deque<std::pair<Message, Promise<Empty>>> writes;
  Status write_status = status;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (read_end_) return;
    read_end_ = status;
    close_read_ = status.ok();
    reads.swap(pending_reads_);  // non-empty only when the inbox is empty
    if (settings_.we_called || !status.ok()) {
      // The serving side is done (its handler returned) or the stream failed: writes are futile.
      if (status.ok()) {
        write_status = Status(StatusCode::kFailedPrecondition,
                              "peer " + peer_.ToString() + " already finished the stream");
      }
      if (!write_end_) write_end_ = write_status;
      writes.swap(pending_writes_);
    }
    if (!status.ok()) cancelled_->store(true);
  }
  writer_cv_.notify_all();
  for (auto& read : reads) {
    if (status.ok()) {
      read.Set(std::optional<Message>());
    } else {
      read.Set(status);
    }
  }
  for (auto& write : writes) write.second.Set(write_status);
}

void DirectStream::RunReader() {
  const size_t max_frame = MaxDirectFrameBytes(settings_.limits.max_header_bytes);
  while (true) {
    std::shared_ptr<const ReceivePlacer> placer;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      placer = placer_;
      bool room = reader_cv_.wait_until(lock, settings_.deadline, [&] {
        return failed_ || discard_reads_ || static_cast<int>(inbox_.size()) < settings_.window;
      });
      if (failed_) break;
      if (!room) {
        lock.unlock();
        Fail(Status(StatusCode::kDeadlineExceeded, "the direct stream reached its deadline"));
        break;
      }
    }
    wire::DirectFrame frame;
    bool closed_between_frames = false;
    Status status = ReadDirectFrame(fd_, max_frame, settings_.deadline, &frame,
                                    &closed_between_frames, cipher_.get());
    Message message;
    if (status.ok() && frame.kind() == wire::DIRECT_DATA) {
      size_t total = frame.header().size();
      for (uint64_t size : frame.payload_sizes()) total += size;
      if (frame.header().size() > settings_.limits.max_header_bytes ||
          frame.payload_sizes_size() > static_cast<int>(kMaxPayloadsPerMessage) ||
          total > settings_.limits.max_message_bytes) {
        status = Status(StatusCode::kResourceExhausted,
                        "peer " + peer_.ToString() + " sent a message of " + std::to_string(total) +
                            " bytes, over this node's limits");
      } else {
        message.header = std::move(*frame.mutable_header());
        for (uint64_t size : frame.payload_sizes()) {
          Payload placed;
          if (placer) placed = placer->place(message.header, message.payloads.size(), size);
          if (placed.data() != nullptr && placed.size() != size) {
            placer->placed(placed, false);
            placed = Payload();
          }
          Payload payload = placed.data() != nullptr ? placed : settings_.buffers->Take(size);
          const bool observe = placed.data() != nullptr && placer->arrived;
          status = ReadDirectPayload(fd_, payload.mutable_data(), size, settings_.deadline,
                                     cipher_.get(), observe ? &placer->arrived : nullptr);
          if (placed.data() != nullptr) placer->placed(placed, status.ok());
          if (!status.ok()) break;
          message.payloads.push_back(std::move(payload));
        }
      }
    } else if (status.ok() && frame.kind() != wire::DIRECT_CLOSE) {
      status = Status(StatusCode::kProtocolError,
                      "peer " + peer_.ToString() + " sent an unexpected direct frame");
    }
    if (!status.ok()) {
      bool ended;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ended = failed_.has_value() || (discard_reads_ && closed_between_frames);
      }
      if (!ended) {
        if (closed_between_frames) {
          status = Status(StatusCode::kUnavailable,
                          "peer " + peer_.ToString() + " closed the direct stream's connection");
        }
        Fail(status);
      }
      break;
    }
    if (frame.kind() == wire::DIRECT_CLOSE) {
      Status remote = FromWire(frame.status());
      OnRemoteClose(remote.ok() ? remote
                                : remote.WithContext("stream on peer " + peer_.ToString()));
      break;
    }
    Deliver(std::move(message));
  }
  ThreadEnded();
}

void DirectStream::ThreadEnded() {
  int fd = -1;
  bool reuse = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--threads_running_ == 0) {
      fd = fd_;
      reuse = fd >= 0 && settings_.reusable && close_written_ && close_read_ && !failed_;
      if (reuse) fd_ = -1;  // no longer ours: Fail and the destructor leave it alone
    }
  }
  if (reuse) {
    settings_.reusable(fd, cipher_);
    return;
  }
  // Nothing more goes either way: the peer sees the end now, not when the last owner lets go.
  if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
}

}  // namespace hivemind::net
