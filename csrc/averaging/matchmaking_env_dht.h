// The production MatchmakingEnv: a real peer's dht::DhtRunner and the net::Node it runs on.
#pragma once

#include "averaging/matchmaking_env.h"

namespace hivemind::averaging {

// Forwards every call to `dht` (which must outlive it) and to dht.node(), unchanged.
class DhtRunnerMatchmakingEnv : public MatchmakingEnv {
 public:
  explicit DhtRunnerMatchmakingEnv(dht::DhtRunner& dht);

  Future<dht::DhtRunnerStoreResult> StoreSubkey(const std::string& key, const std::string& subkey,
                                                std::string value,
                                                dht::DhtTime expiration) override;
  Future<std::optional<dht::DhtRunnerValue>> GetLatest(const std::string& key) override;
  dht::DhtTime Now() const override;
  std::string owner_marker() const override;

  const net::PeerId& peer_id() const override;
  std::vector<std::string> visible_addresses() const override;
  bool client_mode() const override;
  bool is_running() const override;

  void RegisterUnary(const std::string& method, net::UnaryHandler handler) override;
  Future<net::Message> Call(const net::PeerAddress& peer, const std::string& method,
                            net::Message request, std::chrono::milliseconds timeout) override;

 private:
  dht::DhtRunner& dht_;
  net::Node& node_;
};

}  // namespace hivemind::averaging
