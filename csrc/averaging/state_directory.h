#pragma once

// Where newcomers find state donors: every donor keeps an entry in the DHT dictionary
// "<prefix>.state" (one subkey per donor, owner-signed so nobody else can overwrite it) saying
// which version it serves, how big it is, where to reach it and how busy it is. Readers order the
// donors newest version first, least loaded next, at random among equals (so newcomers spread over
// donors instead of all picking the same one, hivemind issue #169).

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "dht/dht_runner.h"
#include "net/address.h"

namespace hivemind::averaging {

// A donor as a downloader sees it. For explicit donors (no DHT) only `address` is needed: version 0
// and an empty digest mean "unknown until its manifest arrives".
struct StateDonorInfo {
  net::PeerAddress address;
  uint64_t version = 0;
  std::string digest;  // BLAKE2b-256 of the served content's manifest, 32 bytes
  uint64_t total_bytes = 0;
  uint32_t active_downloads = 0;

  static StateDonorInfo FromAddress(net::PeerAddress address) {
    StateDonorInfo info;
    info.address = std::move(address);
    return info;
  }
};

// "<prefix>.state"
std::string StateDirectoryKey(const std::string& prefix);

// One refresh of a donor's entry, expiring `ttl` from now. The caller repeats it (well within
// `ttl`) for as long as it wants to be found; nothing here runs in the background.
Status AdvertiseStateDonor(dht::DhtRunner& dht, const std::string& prefix,
                           const StateDonorInfo& info, std::chrono::seconds ttl);

// The live donors under `prefix`, ordered (see OrderStateDonors). Entries that do not parse are
// skipped with a warning: they come from other peers. No entry at all is an empty list, not an
// error.
Result<std::vector<StateDonorInfo>> FindStateDonors(dht::DhtRunner& dht, const std::string& prefix,
                                                    std::optional<uint64_t> seed = std::nullopt);

// Newest version first, then fewest active downloads, then a random order drawn from `seed` (from
// std::random_device when unset).
void OrderStateDonors(std::vector<StateDonorInfo>& donors,
                      std::optional<uint64_t> seed = std::nullopt);

}  // namespace hivemind::averaging
