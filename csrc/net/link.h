#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "net/address.h"
#include "net/peer_id.h"
#include "net/wire.h"

namespace hivemind::net {

// One connection to a remote peer, owned by the reactor thread. An outbound link has its own DEALER
// socket; an inbound one is a routing id on the node's ROUTER. Either kind carries calls started by
// both sides, so two peers need only one connection.
struct Link {
  enum class State { kConnecting, kReady, kDead };

  Link() = default;
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;
  ~Link() { CloseSocket(); }

  uint64_t id = 0;
  bool outbound = false;
  State state = State::kConnecting;
  PeerId peer;
  bool peer_verified = false;  // inbound: after a valid HELLO
  bool peer_client_mode = false;

  // Outbound.
  std::unique_ptr<zmq::socket_t> socket;
  std::unique_ptr<zmq::socket_t> monitor;
  std::vector<Endpoint> endpoints;
  size_t endpoint_index = 0;
  int connection_attempts = 0;
  int handshake_disconnects = 0;  // connections closed before HELLO_ACK
  std::chrono::steady_clock::time_point connect_deadline;
  bool blocked = false;  // the DEALER said EAGAIN: wait for POLLOUT

  // Inbound.
  std::string routing_id;
  int fd = -1;
  std::string authenticated_key;  // ZAP User-Id: hex of the CURVE key the link authenticated

  // Sending: control messages go first and need no credit; each call's messages leave in order, and
  // calls take turns chunk by chunk so a large transfer does not hold up small calls.
  int send_credit = 0;
  std::deque<std::vector<zmq::message_t>> control;
  std::map<uint64_t, std::deque<OutgoingMessage>> call_queues;
  std::deque<uint64_t> call_ring;
  std::vector<zmq::message_t> staged;  // a ZeroMQ message that got EAGAIN
  bool staged_costs_credit = false;

  // Receiving.
  struct Pending {
    std::optional<Reassembly> assembly;  // nullopt: the message was refused; skip its chunks
    uint32_t chunks_left = 0;
  };
  std::map<uint64_t, Pending> pending;
  size_t pending_bytes = 0;
  int credit_to_return = 0;
  int inbound_streams = 0;
  int inflight_requests = 0;

  bool HasOutput() const { return !control.empty() || !call_ring.empty() || !staged.empty(); }

  // Closes an outbound link's socket and its monitor. libzmq's I/O thread sends monitor events
  // with a blocking send, and a monitored socket goes on emitting events (a reconnect refused, a
  // disconnection) while libzmq tears it down after zmq_close. Once our end of the monitor is
  // closed, such an event blocks the I/O thread for good, and with it every connection of the
  // node (seen when a peer died: its survivors' later connections all timed out). Stopping the
  // monitor first means no event is ever sent to a closed reader (libzmq issue #3575).
  void CloseSocket() {
    if (socket) zmq_socket_monitor(socket->handle(), nullptr, 0);
    socket.reset();
    monitor.reset();
  }
};

// Key of a call within a link's queues: call ids are chosen by the caller, so the direction
// tells apart two calls with the same id started by each side.
inline uint64_t CallKey(uint64_t call_id, bool from_caller) {
  return (call_id << 1) | (from_caller ? 1 : 0);
}

}  // namespace hivemind::net
