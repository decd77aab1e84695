#include "swarm/swarm_peer.h"

#include <mutex>

namespace hivemind::swarm {
namespace {

std::mutex g_peer_mutex;
std::weak_ptr<SwarmPeer> g_peer;

}  // namespace

Result<std::shared_ptr<SwarmPeer>> SwarmPeer::Acquire(const dht::DhtRunnerOptions& options) {
  std::lock_guard<std::mutex> lock(g_peer_mutex);
  if (auto live = g_peer.lock()) return live;
  auto runner = dht::DhtRunner::Start(options);
  if (!runner.ok()) return runner.status().WithContext("starting this process's swarm peer");
  std::shared_ptr<SwarmPeer> peer(new SwarmPeer());
  peer->dht_ = std::move(runner).value();
  peer->mailbox_ = std::make_unique<Mailbox>(peer->dht_->node());
  peer->allreduce_ = std::make_unique<averaging::AllReduceService>(peer->dht_->node());
  peer->matchmaker_ = std::make_unique<averaging::Matchmaker>(*peer->dht_);
  g_peer = peer;
  return peer;
}

std::shared_ptr<SwarmPeer> SwarmPeer::Current() {
  std::lock_guard<std::mutex> lock(g_peer_mutex);
  return g_peer.lock();
}

void SwarmPeer::Shutdown() {
  matchmaker_->Shutdown();
  mailbox_->Shutdown();
  dht_->Shutdown();
}

SwarmPeer::~SwarmPeer() {
  Shutdown();
  matchmaker_.reset();
  allreduce_.reset();
  mailbox_.reset();
}

std::string SwarmPeer::address() const {
  std::string joined;
  for (const std::string& address : dht_->visible_addresses()) {
    joined += (joined.empty() ? "" : " ") + address;
  }
  return joined;
}

}  // namespace hivemind::swarm
