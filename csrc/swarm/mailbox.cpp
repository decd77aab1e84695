#include "swarm/mailbox.h"

#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <utility>

#include "common/logging.h"

namespace hivemind::swarm {

struct Mailbox::State {
  struct Entry {
    net::Message message;
    Clock::time_point arrived;
  };
  std::mutex mutex;
  std::condition_variable arrived;
  // (sender peer id bytes, key) -> message.
  std::map<std::pair<std::string, std::string>, Entry> entries;
  size_t buffered_bytes = 0;
  bool shut_down = false;

  void DropExpiredLocked(Clock::time_point now, std::chrono::milliseconds max_age) {
    for (auto it = entries.begin(); it != entries.end();) {
      if (now - it->second.arrived > max_age) {
        buffered_bytes -= it->second.message.PayloadBytes();
        it = entries.erase(it);
      } else {
        ++it;
      }
    }
  }
};

Mailbox::Mailbox(net::Node& node, MailboxOptions options)
    : node_(node), options_(std::move(options)), state_(std::make_shared<State>()) {
  std::weak_ptr<State> weak = state_;
  const MailboxOptions limits = options_;
  node_.RegisterUnary(
      options_.method_prefix + ".deliver",
      [weak, limits](const net::CallContext& context, net::Message request,
                     net::Responder respond) {
        auto state = weak.lock();
        if (!state) {
          respond(Status(StatusCode::kUnavailable, "this peer's mailbox is shut down"));
          return;
        }
        if (request.header.empty() || request.header.size() > limits.max_key_bytes) {
          respond(Status(StatusCode::kInvalidArgument,
                         "mailbox key must be 1.." + std::to_string(limits.max_key_bytes) +
                             " bytes, got " + std::to_string(request.header.size())));
          return;
        }
        const size_t bytes = request.PayloadBytes();
        {
          std::lock_guard<std::mutex> lock(state->mutex);
          if (state->shut_down) {
            respond(Status(StatusCode::kUnavailable, "this peer's mailbox is shut down"));
            return;
          }
          const Clock::time_point now = Clock::now();
          state->DropExpiredLocked(now, limits.max_age);
          if (state->buffered_bytes + bytes > limits.max_buffered_bytes) {
            respond(Status(StatusCode::kResourceExhausted,
                           "the receiver already buffers " + std::to_string(state->buffered_bytes) +
                               " bytes of unclaimed messages (limit " +
                               std::to_string(limits.max_buffered_bytes) + ")"));
            return;
          }
          auto key = std::make_pair(std::string(context.peer.raw()), request.header);
          if (state->entries.count(key) != 0) {
            // A resend after a lost reply (see SendAsync): the message is already here.
            respond(net::Message());
            return;
          }
          state->buffered_bytes += bytes;
          state->entries.emplace(std::move(key), State::Entry{std::move(request), now});
        }
        state->arrived.notify_all();
        respond(net::Message());
      });
  node_.RegisterUnary(options_.method_prefix + ".ping",
                      [](const net::CallContext&, net::Message, net::Responder respond) {
                        respond(net::Message());
                      });
}

Mailbox::~Mailbox() { Shutdown(); }

void Mailbox::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->shut_down = true;
    state_->entries.clear();
    state_->buffered_bytes = 0;
  }
  state_->arrived.notify_all();
}

Future<net::Message> Mailbox::SendAsync(const net::PeerAddress& to, const std::string& key,
                                        std::vector<net::Payload> payloads,
                                        Clock::time_point deadline) {
  Promise<net::Message> done;
  auto future = done.future();
  Attempt(to, net::Message(key, std::move(payloads)), deadline, kSendAttempts, std::move(done));
  return future;
}

void Mailbox::Attempt(const net::PeerAddress& to, net::Message message, Clock::time_point deadline,
                      int attempts_left, Promise<net::Message> done) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (left.count() <= 0) {
    done.Set(Status(StatusCode::kDeadlineExceeded, "the deadline passed before the send started"));
    return;
  }
  net::CallOptions call;
  call.timeout = left;
  // Payloads are shared, not copied: keeping `message` for a resend costs nothing.
  node_.Call(to, options_.method_prefix + ".deliver", message, call)
      .OnReady([this, state = std::weak_ptr<State>(state_), to, message, deadline, attempts_left,
                done](const Result<net::Message>& result) mutable {
        // A connection that drops under a call (not a refused one: that peer is gone) may have
        // delivered the message or not; the receiver takes a resend of a message it holds as a
        // success, so resending is safe.
        const bool retry = !result.ok() && result.status().code() == StatusCode::kUnavailable &&
                           attempts_left > 1 && Clock::now() < deadline && !state.expired();
        if (!retry) {
          done.Set(result);
          return;
        }
        HM_LOG(kInfo) << "mailbox: resending '" << message.header << "' to "
                      << to.peer_id.ShortString() << " after: " << result.status().ToString();
        Attempt(to, std::move(message), deadline, attempts_left - 1, std::move(done));
      });
}

Status Mailbox::Send(const net::PeerAddress& to, const std::string& key,
                     std::vector<net::Payload> payloads, Clock::time_point deadline) {
  return SendAsync(to, key, std::move(payloads), deadline).Wait().status();
}

Status Mailbox::Ping(const net::PeerAddress& peer, std::chrono::milliseconds timeout) {
  net::CallOptions call;
  call.timeout = timeout;
  return node_.Call(peer, options_.method_prefix + ".ping", net::Message(), call).Wait().status();
}

Result<net::Message> Mailbox::Receive(const net::PeerAddress& from, const std::string& key,
                                      Clock::time_point deadline) {
  const auto entry_key = std::make_pair(std::string(from.peer_id.raw()), key);
  std::unique_lock<std::mutex> lock(state_->mutex);
  while (true) {
    if (state_->shut_down) return Status(StatusCode::kCancelled, "the mailbox is shut down");
    auto it = state_->entries.find(entry_key);
    if (it != state_->entries.end()) {
      net::Message message = std::move(it->second.message);
      state_->buffered_bytes -= message.PayloadBytes();
      state_->entries.erase(it);
      return message;
    }
    const Clock::time_point now = Clock::now();
    if (now >= deadline) {
      return Status(
          StatusCode::kDeadlineExceeded,
          "no message '" + key + "' from " + from.peer_id.ShortString() + " before the deadline");
    }
    const Clock::time_point wake = std::min(deadline, now + options_.probe_interval);
    if (state_->arrived.wait_until(lock, wake) == std::cv_status::timeout && wake < deadline) {
      // Nothing for a while: make sure the sender is still there. Without the lock: the ping
      // takes a round trip, deliveries must not wait for it.
      lock.unlock();
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      Status alive = Ping(
          from, std::max(std::chrono::milliseconds(1), std::min(options_.probe_timeout, left)));
      lock.lock();
      if (!alive.ok() && alive.code() != StatusCode::kDeadlineExceeded) {
        if (state_->entries.count(entry_key) != 0) continue;  // it arrived meanwhile
        return Status(StatusCode::kUnavailable, "peer " + from.peer_id.ShortString() +
                                                    " stopped answering while this peer waited "
                                                    "for '" +
                                                    key + "': " + alive.ToString());
      }
    }
  }
}

}  // namespace hivemind::swarm
