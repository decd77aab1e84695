// Keyed point-to-point delivery between peers: the primitive under the c10d backend's
// rank-addressed collectives (broadcast, gather, all-to-all, send/recv...) and group formation.
//
// A sender hands a message to the receiver's mailbox under a key ("<launch>/<op>/<part>"); the
// receiver takes it out with Receive(from, key) whenever it gets there, before or after it
// arrived. While it waits, the receiver probes the sender now and then, so a dead sender ends the
// wait in about a second instead of at the operation's deadline. docs/c10d.md has the details.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "common/future.h"
#include "common/status.h"
#include "net/address.h"
#include "net/message.h"
#include "net/node.h"

namespace hivemind::swarm {

using Clock = std::chrono::steady_clock;

struct MailboxOptions {
  // Methods are "<prefix>.deliver" and "<prefix>.ping".
  std::string method_prefix = "swarm.v1";
  // Bytes held for keys nobody has asked for yet; deliveries beyond it are refused with
  // RESOURCE_EXHAUSTED (the sender's operation fails, nothing is dropped silently).
  size_t max_buffered_bytes = size_t{4} << 30;
  // Unclaimed messages older than this are dropped (the operation they were for has failed).
  std::chrono::milliseconds max_age{std::chrono::hours(2)};
  // A receiver that has waited this long without news pings the sender.
  std::chrono::milliseconds probe_interval{1000};
  std::chrono::milliseconds probe_timeout{5000};
  size_t max_key_bytes = 1024;
};

class Mailbox {
 public:
  // Registers the deliver and ping methods on `node`, which must outlive the mailbox.
  explicit Mailbox(net::Node& node, MailboxOptions options = {});
  ~Mailbox();
  Mailbox(const Mailbox&) = delete;
  Mailbox& operator=(const Mailbox&) = delete;

  // Completes once the receiver holds the message (or with the reason it could not).
  Future<net::Message> SendAsync(const net::PeerAddress& to, const std::string& key,
                                 std::vector<net::Payload> payloads, Clock::time_point deadline);
  Status Send(const net::PeerAddress& to, const std::string& key,
              std::vector<net::Payload> payloads, Clock::time_point deadline);

  // The message `from` sent under `key`. UNAVAILABLE when `from` stops answering pings,
  // DEADLINE_EXCEEDED at the deadline, CANCELLED after Shutdown().
  Result<net::Message> Receive(const net::PeerAddress& from, const std::string& key,
                               Clock::time_point deadline);

  // OK when `peer` answers within `timeout`.
  Status Ping(const net::PeerAddress& peer, std::chrono::milliseconds timeout);

  // Fails the waiting receivers with CANCELLED; later deliveries are refused.
  void Shutdown();

  net::Node& node() { return node_; }
  struct State;

 private:
  // Sends that fail because the connection dropped are tried this many times in all.
  static constexpr int kSendAttempts = 2;
  void Attempt(const net::PeerAddress& to, net::Message message, Clock::time_point deadline,
               int attempts_left, Promise<net::Message> done);

  net::Node& node_;
  MailboxOptions options_;
  std::shared_ptr<State> state_;
};

}  // namespace hivemind::swarm
