#pragma once

// The downloading side of state transfer (docs/state_transfer.md): fetch the manifest, then every
// chunk, verifying each against its BLAKE2b checksum; when a donor fails (error, silence, bad
// bytes) continue from the last verified byte with the next donor serving identical content, or
// start over with another version when none does. Every wait is bounded by the options.

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "averaging/state_directory.h"
#include "averaging/state_donor.h"
#include "averaging/state_snapshot.h"
#include "common/status.h"
#include "dht/dht_runner.h"
#include "net/node.h"

namespace hivemind::averaging {

struct StateDownloadProgress {
  net::PeerId donor;
  uint64_t version = 0;
  uint64_t verified_bytes = 0;  // a prefix of the byte stream, checked against the checksums
  uint64_t total_bytes = 0;
};

struct StateDownloadOptions {
  std::string method = kStateTransferMethod;
  // Bound on the whole download, every donor included.
  std::chrono::milliseconds timeout{300000};
  // Bound on each wait for the donor: its manifest, then each next chunk. A donor silent this long
  // is abandoned for the next one.
  std::chrono::milliseconds message_timeout{30000};
  // Refuse manifests describing more than this (the downloader allocates the whole state up
  // front, and the manifest comes from another peer).
  uint64_t max_total_bytes = uint64_t{64} << 30;
  // How many times to start over with another version when no remaining donor serves the version
  // already half-downloaded.
  int max_restarts = 2;
  // Called on the downloading thread after each verified chunk; keep it short.
  std::function<void(const StateDownloadProgress&)> on_progress;
};

// One donor contacted during a download.
struct StateDonorAttempt {
  net::PeerId peer;
  uint64_t version = 0;         // what it served; 0 if it never sent a valid manifest
  uint64_t start_offset = 0;    // where this donor was asked to start
  uint64_t bytes_received = 0;  // chunk bytes received from it, verified or not
  uint64_t bytes_verified = 0;  // of which passed their checksum
  Status status;                // OK for the donor that finished the download
};

struct DownloadedState {
  StateSnapshot snapshot;
  uint64_t version = 0;
  std::string digest;
  std::vector<StateDonorAttempt> attempts;
  uint64_t bytes_received = 0;  // over all donors; above TotalBytes() when chunks were re-fetched
  int restarts = 0;             // times the download started over with another version
};

// Downloads from `donors`, tried in the given order (a DHT listing is already ordered by
// FindStateDonors); donors whose advertised version differs from the one being downloaded are
// kept for a restart. Peers equal to node.peer_id() are skipped. Fails with NOT_FOUND when there
// is no donor, DEADLINE_EXCEEDED when options.timeout passes, and otherwise UNAVAILABLE naming
// every donor tried and why it failed.
Result<DownloadedState> DownloadState(net::Node& node, std::vector<StateDonorInfo> donors,
                                      const StateDownloadOptions& options = {});

// FindStateDonors(dht, prefix) then DownloadState. NOT_FOUND when nobody advertises state there.
Result<DownloadedState> DownloadStateFromDht(net::Node& node, dht::DhtRunner& dht,
                                             const std::string& prefix,
                                             const StateDownloadOptions& options = {});

}  // namespace hivemind::averaging
