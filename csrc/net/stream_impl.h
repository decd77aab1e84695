#pragma once

#include <atomic>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "common/worker_pool.h"
#include "net/command_queue.h"
#include "net/node.h"
#include "net/wire.h"

namespace hivemind::net {

class StreamImpl;

// What a stream asks of the node; every method runs on the reactor thread.
class StreamTransport {
 public:
  virtual ~StreamTransport() = default;
  virtual void SendStreamData(StreamImpl& stream, Message message) = 0;
  virtual void SendStreamClose(StreamImpl& stream, Status status) = 0;
  virtual void SendStreamCredit(StreamImpl& stream, int messages) = 0;
  // Tells the other side this side aborted, and forgets the stream.
  virtual void AbortStream(StreamImpl& stream, Status status) = 0;
};

// One end of a stream. User threads call the Stream methods; the reactor calls the On* methods.
// Flow control: this side may send `send_credit` more messages; the reader returns credit as the
// application consumes messages, so neither side buffers more than the window.
class StreamImpl : public Stream, public std::enable_shared_from_this<StreamImpl> {
 public:
  StreamImpl(PeerId peer, uint64_t link_id, uint64_t call_id, bool we_called, int window,
             std::shared_ptr<CommandQueue> reactor, std::shared_ptr<WorkerPool> pool,
             StreamTransport* transport, MessageLimits limits);

  const PeerId& peer() const override { return peer_; }
  Future<Empty> Write(Message message) override;
  void CloseWrite() override;
  Future<std::optional<Message>> Read() override;
  void Cancel() override;

  uint64_t link_id() const { return link_id_; }
  uint64_t call_id() const { return call_id_; }
  bool we_called() const { return we_called_; }

  // Reactor side.
  void OnData(Message message);
  // The other side ended its writes: OK = end of stream; an error fails this stream.
  void OnRemoteClose(const Status& status);
  void OnCredit(int messages);
  // Fails every pending and future read and write with `status`. Any thread. Returns false if
  // the stream had already failed.
  bool Fail(const Status& status);
  // The handler of a served stream returned `status`: close writes with it once queued writes
  // leave.
  void FinishFromHandler(const Status& status);
  bool finished_locally() const;

 private:
  // Hands `action` to the reactor thread. When the node is shut down it only notes that (callers
  // may hold mutex_); FailIfReactorGone(), called without mutex_, then fails the stream.
  void PostToReactor(std::function<void(StreamImpl&)> action);
  void FailIfReactorGone();
  // Called with mutex_ held: sends what credit allows, and the close once writes are drained.
  // Returns the write promises to complete after the lock is released.
  std::vector<Promise<Empty>> PumpWritesLocked();

  const PeerId peer_;
  const uint64_t link_id_;
  const uint64_t call_id_;
  const bool we_called_;
  const int window_;
  std::shared_ptr<CommandQueue> reactor_;
  std::shared_ptr<WorkerPool> pool_;
  StreamTransport* transport_;
  const MessageLimits limits_;

  // Called with mutex_ held after a message left the inbox: returns credit in batches.
  void NoteConsumedLocked();

  mutable std::mutex mutex_;
  std::atomic<bool> reactor_gone_{false};
  std::deque<Message> inbox_;
  std::deque<Promise<std::optional<Message>>> pending_reads_;
  // Once set, reads return it after the inbox is drained (OK reads as end of stream).
  std::optional<Status> read_end_;
  int consumed_since_credit_ = 0;
  int send_credit_;
  std::deque<std::pair<Message, Promise<Empty>>> pending_writes_;
  // Once set, writes fail with it.
  std::optional<Status> write_end_;
  std::optional<Status> close_status_;  // what to send once pending writes are out
  bool close_sent_ = false;
  bool failed_ = false;
};

}  // namespace hivemind::net
