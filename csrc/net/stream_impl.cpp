#include "net/stream_impl.h"

#include <algorithm>

namespace hivemind::net {

StreamImpl::StreamImpl(PeerId peer, uint64_t link_id, uint64_t call_id, bool we_called, int window,
                       std::shared_ptr<CommandQueue> reactor, std::shared_ptr<WorkerPool> pool,
                       StreamTransport* transport, MessageLimits limits)
    : peer_(peer),
      link_id_(link_id),
      call_id_(call_id),
      we_called_(we_called),
      window_(window),
      reactor_(std::move(reactor)),
      pool_(std::move(pool)),
      transport_(transport),
      limits_(limits),
      send_credit_(window) {}

void StreamImpl::PostToReactor(std::function<void(StreamImpl&)> action) {
  auto self = shared_from_this();
  bool posted = reactor_->Post([self, action = std::move(action)] { action(*self); });
  // Not Fail() here: most callers hold mutex_, which Fail() takes (that deadlocked a node shutting
  // down under a stream write). They call FailIfReactorGone() once they released it.
  if (!posted) reactor_gone_ = true;
}

void StreamImpl::FailIfReactorGone() {
  if (reactor_gone_) Fail(Status(StatusCode::kCancelled, "the node is shut down"));
}

std::vector<Promise<Empty>> StreamImpl::PumpWritesLocked() {
  std::vector<Promise<Empty>> written;
  while (send_credit_ > 0 && !pending_writes_.empty()) {
    auto [message, promise] = std::move(pending_writes_.front());
    pending_writes_.pop_front();
    --send_credit_;
    auto shared = std::make_shared<Message>(std::move(message));
    PostToReactor([transport = transport_, shared](StreamImpl& self) {
      transport->SendStreamData(self, std::move(*shared));
    });
    written.push_back(std::move(promise));
  }
  if (close_status_ && pending_writes_.empty() && !close_sent_) {
    close_sent_ = true;
    PostToReactor([transport = transport_, status = *close_status_](StreamImpl& self) {
      transport->SendStreamClose(self, status);
    });
  }
  return written;
}

Future<Empty> StreamImpl::Write(Message message) {
  Status size = limits_.Check(message);
  if (!size.ok()) return Future<Empty>::Ready(size);
  Promise<Empty> promise;
  std::vector<Promise<Empty>> written;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (write_end_) return Future<Empty>::Ready(*write_end_);
    if (close_status_) {
      return Future<Empty>::Ready(
          Status(StatusCode::kFailedPrecondition, "write after CloseWrite on this stream"));
    }
    pending_writes_.emplace_back(std::move(message), promise);
    written = PumpWritesLocked();
  }
  FailIfReactorGone();
  for (auto& done : written) done.Set(Empty{});
  return promise.future();
}

void StreamImpl::CloseWrite() { FinishFromHandler(Status::Ok()); }

void StreamImpl::FinishFromHandler(const Status& status) {
  std::vector<Promise<Empty>> written;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (write_end_ || close_status_) return;
    close_status_ = status;
    written = PumpWritesLocked();
  }
  FailIfReactorGone();
  for (auto& done : written) done.Set(Empty{});
}

bool StreamImpl::finished_locally() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return close_sent_ || failed_;
}

void StreamImpl::NoteConsumedLocked() {
  if (++consumed_since_credit_ < std::max(1, window_ / 4)) return;
  int credit = consumed_since_credit_;
  consumed_since_credit_ = 0;
  if (read_end_) return;  // the writer is done; nobody needs the credit
  PostToReactor([transport = transport_, credit](StreamImpl& self) {
    transport->SendStreamCredit(self, credit);
  });
}

Future<std::optional<Message>> StreamImpl::Read() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!inbox_.empty()) {
    Message message = std::move(inbox_.front());
    inbox_.pop_front();
    NoteConsumedLocked();
    lock.unlock();
    FailIfReactorGone();
    return Future<std::optional<Message>>::Ready(std::optional<Message>(std::move(message)));
  }
  if (read_end_) {
    if (read_end_->ok()) return Future<std::optional<Message>>::Ready(std::optional<Message>());
    return Future<std::optional<Message>>::Ready(*read_end_);
  }
  pending_reads_.emplace_back();
  return pending_reads_.back().future();
}

void StreamImpl::Cancel() {
  Status cancelled(StatusCode::kCancelled, "the stream was cancelled by this side");
  if (!Fail(cancelled)) return;
  PostToReactor([transport = transport_, cancelled](StreamImpl& self) {
    transport->AbortStream(self, cancelled);
  });
  // Already failed above: nothing more to do if the reactor is gone.
}

void StreamImpl::OnData(Message message) {
  bool overflow = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (read_end_) return;
    if (!pending_reads_.empty()) {
      auto promise = std::move(pending_reads_.front());
      pending_reads_.pop_front();
      NoteConsumedLocked();
      auto shared = std::make_shared<Message>(std::move(message));
      pool_->Post([promise, shared] { promise.Set(std::optional<Message>(std::move(*shared))); });
    } else {
      inbox_.push_back(std::move(message));
      overflow = static_cast<int>(inbox_.size()) > window_;
    }
  }
  FailIfReactorGone();
  if (overflow) {
    Status violation(StatusCode::kProtocolError,
                     "peer " + peer_.ToString() + " wrote past the stream's flow-control window");
    if (Fail(violation)) transport_->AbortStream(*this, violation);
  }
}

void StreamImpl::OnRemoteClose(const Status& status) {
  std::deque<Promise<std::optional<Message>>> reads;
  std::deque<std::pair<Message, Promise<Empty>>> writes;
  Status write_status = status;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (read_end_) return;
    read_end_ = status;
    reads.swap(pending_reads_);  // non-empty only when the inbox is empty
    if (we_called_ || !status.ok()) {
      // The serving side is done (its handler returned) or the stream failed: writes are futile.
      if (status.ok()) {
        write_status = Status(StatusCode::kFailedPrecondition,
                              "peer " + peer_.ToString() + " already finished the stream");
      }
      if (!write_end_) write_end_ = write_status;
      writes.swap(pending_writes_);
    }
  }
  for (auto& read : reads) {
    pool_->Post([read, status] {
      if (status.ok()) {
        read.Set(std::optional<Message>());
      } else {
        read.Set(status);
      }
    });
  }
  for (auto& write : writes) {
    pool_->Post([promise = write.second, write_status] { promise.Set(write_status); });
  }
}

void StreamImpl::OnCredit(int messages) {
  std::vector<Promise<Empty>> written;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    send_credit_ += messages;
    written = PumpWritesLocked();
  }
  FailIfReactorGone();
  for (auto& done : written) pool_->Post([done] { done.Set(Empty{}); });
}

bool StreamImpl::Fail(const Status& status) {
  std::deque<Promise<std::optional<Message>>> reads;
  std::deque<std::pair<Message, Promise<Empty>>> writes;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) return false;
    failed_ = true;
    // Messages that arrived before a clean end stay readable; otherwise reads fail now.
    if (!read_end_) {
      read_end_ = status;
      inbox_.clear();
    }
    if (!write_end_) write_end_ = status;
    reads.swap(pending_reads_);
    writes.swap(pending_writes_);
  }
  for (auto& read : reads) pool_->Post([read, status] { read.Set(status); });
  for (auto& write : writes) {
    pool_->Post([promise = write.second, status] { promise.Set(status); });
  }
  return true;
}

}  // namespace hivemind::net
