#include "averaging/state_directory.h"

#include <algorithm>
#include <random>

#include "averaging/state_transfer_wire.h"
#include "common/logging.h"

namespace hivemind::averaging {

std::string StateDirectoryKey(const std::string& prefix) { return prefix + ".state"; }

Status AdvertiseStateDonor(dht::DhtRunner& dht, const std::string& prefix,
                           const StateDonorInfo& info, std::chrono::seconds ttl) {
  if (ttl.count() <= 0) return Status(StatusCode::kInvalidArgument, "advert ttl must be positive");
  wire::StateAdvert advert;
  advert.set_version(info.version);
  advert.set_digest(info.digest);
  advert.set_total_bytes(info.total_bytes);
  for (const auto& address : info.address.ToStrings()) advert.add_addresses(address);
  advert.set_active_downloads(info.active_downloads);
  // The subkey names the DHT runner as owner, so the record is signed and no other peer can
  // overwrite or forge this donor's entry.
  auto stored = dht.Store(StateDirectoryKey(prefix), advert.SerializeAsString(),
                          dht::DhtNow() + static_cast<double>(ttl.count()), dht.owner_marker());
  if (!stored.ok()) return stored.status().WithContext("cannot advertise state");
  if (!stored->status.ok()) return stored->status.WithContext("cannot advertise state");
  return Status::Ok();
}

void OrderStateDonors(std::vector<StateDonorInfo>& donors, std::optional<uint64_t> seed) {
  std::mt19937_64 random(seed ? *seed : std::random_device{}());
  std::shuffle(donors.begin(), donors.end(), random);
  std::stable_sort(donors.begin(), donors.end(),
                   [](const StateDonorInfo& a, const StateDonorInfo& b) {
                     if (a.version != b.version) return a.version > b.version;
                     return a.active_downloads < b.active_downloads;
                   });
}

Result<std::vector<StateDonorInfo>> FindStateDonors(dht::DhtRunner& dht, const std::string& prefix,
                                                    std::optional<uint64_t> seed) {
  const std::string key = StateDirectoryKey(prefix);
  auto found = dht.Get(key, /*latest=*/true);
  if (!found.ok()) return found.status().WithContext("cannot look up state donors under " + key);
  std::vector<StateDonorInfo> donors;
  if (!found->has_value()) return donors;
  for (const auto& [subkey, entry] : (*found)->dictionary) {
    wire::StateAdvert advert;
    if (!advert.ParseFromString(entry.value) || advert.version() == 0 ||
        advert.addresses_size() == 0) {
      HM_LOG(kWarning) << "ignoring a malformed state advert under " << key;
      continue;
    }
    std::string joined;
    for (const auto& address : advert.addresses()) joined += address + " ";
    auto address = net::PeerAddress::ParseList(joined);
    if (!address.ok()) {
      HM_LOG(kWarning) << "ignoring a state advert under " << key
                       << " with a bad address: " << address.status().ToString();
      continue;
    }
    StateDonorInfo info;
    info.address = std::move(address).value();
    info.version = advert.version();
    info.digest = advert.digest();
    info.total_bytes = advert.total_bytes();
    info.active_downloads = advert.active_downloads();
    donors.push_back(std::move(info));
  }
  OrderStateDonors(donors, seed);
  return donors;
}

}  // namespace hivemind::averaging
