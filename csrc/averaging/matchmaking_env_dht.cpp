#include "averaging/matchmaking_env_dht.h"

#include <utility>

namespace hivemind::averaging {

DhtRunnerMatchmakingEnv::DhtRunnerMatchmakingEnv(dht::DhtRunner& dht)
    : dht_(dht), node_(dht.node()) {}

Future<dht::DhtRunnerStoreResult> DhtRunnerMatchmakingEnv::StoreSubkey(const std::string& key,
                                                                       const std::string& subkey,
                                                                       std::string value,
                                                                       dht::DhtTime expiration) {
  return dht_.StoreAsync(key, std::move(value), expiration, subkey);
}

Future<std::optional<dht::DhtRunnerValue>> DhtRunnerMatchmakingEnv::GetLatest(
    const std::string& key) {
  return dht_.GetAsync(key, /*latest=*/true);
}

dht::DhtTime DhtRunnerMatchmakingEnv::Now() const { return dht::DhtNow(); }

std::string DhtRunnerMatchmakingEnv::owner_marker() const { return dht_.owner_marker(); }

const net::PeerId& DhtRunnerMatchmakingEnv::peer_id() const { return node_.peer_id(); }

std::vector<std::string> DhtRunnerMatchmakingEnv::visible_addresses() const {
  return node_.visible_address().ToStrings();
}

bool DhtRunnerMatchmakingEnv::client_mode() const { return dht_.client_mode(); }

bool DhtRunnerMatchmakingEnv::is_running() const { return dht_.is_running(); }

void DhtRunnerMatchmakingEnv::RegisterUnary(const std::string& method, net::UnaryHandler handler) {
  node_.RegisterUnary(method, std::move(handler));
}

Future<net::Message> DhtRunnerMatchmakingEnv::Call(const net::PeerAddress& peer,
                                                   const std::string& method, net::Message request,
                                                   std::chrono::milliseconds timeout) {
  return node_.Call(peer, method, std::move(request), net::CallOptions{timeout});
}

}  // namespace hivemind::averaging
