// One end of a direct stream (CallOptions::direct, docs/transport.md): a stream on a TCP
// connection of its own, beside the node's ZeroMQ link. A writer thread sends each queued message
// straight from its payloads; a reader thread receives each message into buffers of its own, with
// no hop through a reactor or an I/O thread. TCP paces both sides: the reader stops reading while
// `window` messages wait unread, and a writer blocks while the peer's buffers are full. A stream
// that ends cleanly both ways (each side's close sent and read, both with OK) leaves its
// connection between frames, and gives it back for the next stream (Settings::reusable).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "common/future.h"
#include "common/thread_set.h"
#include "net/direct_cipher.h"
#include "net/node.h"
#include "net/payload_recycler.h"
#include "net/wire.h"

namespace hivemind::net {

class DirectStream : public Stream, public std::enable_shared_from_this<DirectStream> {
 public:
  using Clock = std::chrono::steady_clock;

  struct Settings {
    MessageLimits limits;
    int window = 16;
    Clock::time_point deadline;
    bool we_called = true;
    std::shared_ptr<PayloadRecycler> buffers;  // where received payloads live (the node's)
    // Given the connection (and its cipher, whose record numbers go on) once both threads ended
    // after a clean end both ways; the stream no longer touches it. Unset: the connection is
    // shut down then, as after any other end.
    std::function<void(int fd, std::shared_ptr<DirectCipher> cipher)> reusable;
  };

  DirectStream(PeerId peer, Settings settings, std::shared_ptr<ThreadSet> threads);
  ~DirectStream() override;  // closes the socket

  // Runs the stream on `fd` (connected, non-blocking, handshake done; owned from now on), sealing
  // its records with `cipher` when there is one: starts the reader and the writer. False (and `fd`
  // closed) if the stream failed meanwhile.
  bool Start(int fd, std::shared_ptr<DirectCipher> cipher);
  // Before Start (setup failed in a way an ordinary stream may not): everything written, read,
  // closed or cancelled so far, and from now on, goes to `fallback`.
  void Divert(std::shared_ptr<Stream> fallback);
  // Fails every pending and future read and write with `status` and shuts the connection down;
  // with `tell_peer`, tells the peer why first when the writer is between messages (otherwise the
  // peer sees the connection end, kUnavailable, as if this process had died). Any thread; false
  // if already failed.
  bool Fail(const Status& status, bool tell_peer = true);
  // Server side: the handler returned `status`. The peer gets it once the queued writes are out;
  // whatever the peer still sends is read and dropped.
  void FinishFromHandler(const Status& status);
  // Set when the stream fails or is cancelled (CallContext::cancelled of a served stream).
  const std::shared_ptr<std::atomic<bool>>& cancelled() const { return cancelled_; }
  Clock::time_point deadline() const { return settings_.deadline; }
  // Setup: a call whose Cancel() Fail() must invoke (the offer request while dialing).
  void SetSetupCanceller(std::function<void()> cancel);

  const PeerId& peer() const override { return peer_; }
  Future<Empty> Write(Message message) override;
  void CloseWrite() override;
  Future<std::optional<Message>> Read() override;
  void Cancel() override;
  bool direct() const override { return started_.load(); }
  bool SetReceivePlacer(std::shared_ptr<const ReceivePlacer> placer) override;

 private:
  void RunWriter();
  void RunReader();
  // The next frame for the writer: a message, a close, or nothing once the writer is done.
  struct Outgoing {
    std::optional<Message> message;
    Promise<Empty> promise;
    std::optional<Status> close;
  };
  std::optional<Outgoing> NextOutgoing();
  void OnRemoteClose(const Status& status);
  void Deliver(Message message);
  // Both threads have ended: nothing more goes over the socket.
  void ThreadEnded();
  std::shared_ptr<Stream> fallback() const;

  const PeerId peer_;
  const Settings settings_;
  const std::shared_ptr<ThreadSet> threads_;  // where Start runs the reader and the writer
  const std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
  std::atomic<bool> started_{false};
  int fd_ = -1;                           // set once by Start, closed by the destructor only
  std::shared_ptr<DirectCipher> cipher_;  // set once by Start

  mutable std::mutex mutex_;
  std::condition_variable writer_cv_;  // writes queued, close requested, failure
  std::condition_variable reader_cv_;  // room in the inbox, failure
  std::shared_ptr<Stream> fallback_;
  std::function<void()> setup_canceller_;
  std::shared_ptr<const ReceivePlacer> placer_;
  std::deque<Message> inbox_;
  std::deque<Promise<std::optional<Message>>> pending_reads_;
  std::optional<Status> read_end_;  // reads return it once the inbox is drained (OK: end)
  std::deque<std::pair<Message, Promise<Empty>>> pending_writes_;
  std::optional<Status> write_end_;     // writes fail with it
  std::optional<Status> close_status_;  // what to send once pending writes are out
  bool close_sent_ = false;
  bool close_written_ = false;    // our close went out whole, with OK (not a farewell)
  bool close_read_ = false;       // the peer's close came in, with OK
  bool writing_ = false;          // the writer is in the middle of a frame
  std::optional<Status> failed_;  // set by Fail
  bool tell_peer_ = false;        // Fail left the writer to send the failure and shut down
  bool discard_reads_ = false;    // the handler returned: nobody reads any more
  int threads_running_ = 0;
};

}  // namespace hivemind::net
