// The network presence of one process in the swarm: its DHT node (which is also its transport
// node), and the services every process group of the c10d backend shares on it: the mailbox, the
// butterfly all-reduce service and matchmaking. One per process: the services register fixed
// method names on the node, and "one process per peer" keeps one identity and one connection per
// pair of processes.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "averaging/allreduce.h"
#include "averaging/matchmaking.h"
#include "common/status.h"
#include "dht/dht_runner.h"
#include "swarm/mailbox.h"

namespace hivemind::swarm {

class SwarmPeer {
 public:
  // The process's peer if one is alive (`options` is then ignored), else a new one started with
  // `options`. The peer lives as long as someone holds the returned pointer.
  static Result<std::shared_ptr<SwarmPeer>> Acquire(const dht::DhtRunnerOptions& options);
  // The live peer of this process, or null.
  static std::shared_ptr<SwarmPeer> Current();

  ~SwarmPeer();
  // Stops the services and the node (pending operations fail); the object stays valid. Called at
  // interpreter exit so that no network thread outlives Python.
  void Shutdown();
  SwarmPeer(const SwarmPeer&) = delete;
  SwarmPeer& operator=(const SwarmPeer&) = delete;

  dht::DhtRunner& dht() { return *dht_; }
  Mailbox& mailbox() { return *mailbox_; }
  averaging::AllReduceService& allreduce() { return *allreduce_; }
  averaging::Matchmaker& matchmaker() { return *matchmaker_; }
  // What other ranks dial: this peer's visible multiaddrs, space-separated.
  std::string address() const;

 private:
  SwarmPeer() = default;
  // Declared first, destroyed last: the services go before the node they serve on.
  std::unique_ptr<dht::DhtRunner> dht_;
  std::unique_ptr<Mailbox> mailbox_;
  std::unique_ptr<averaging::AllReduceService> allreduce_;
  std::unique_ptr<averaging::Matchmaker> matchmaker_;
};

}  // namespace hivemind::swarm
