#pragma once

// The serving side of state transfer (docs/state_transfer.md). A StateDonor registers a stream
// method on a net::Node and serves the latest snapshot handed to Publish(). Publishing only swaps a
// shared pointer: a download in progress keeps the snapshot it started with alive and consistent,
// and the trainer never waits for downloads (hivemind's donors hold the tensor lock while serving,
// issue #445). Chunks are sent zero-copy from the snapshot, paced by the stream's flow control.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "averaging/state_directory.h"
#include "averaging/state_snapshot.h"
#include "common/status.h"
#include "dht/dht_runner.h"
#include "net/node.h"

namespace hivemind::averaging {

// The stream method donors register and downloaders call.
inline constexpr char kStateTransferMethod[] = "averaging.v1.state";

struct StateDonorOptions {
  std::string method = kStateTransferMethod;
  // Size of a checksummed chunk; one chunk is one stream message. Part of the content digest: two
  // donors can only take over each other's downloads when they use the same chunk size.
  size_t chunk_bytes = size_t{4} << 20;
  // Downloads served at once; more fail at once with RESOURCE_EXHAUSTED so the newcomer tries
  // another donor instead of queueing.
  int max_concurrent_downloads = 4;
  // How long to wait for the downloader's request, and for the downloader to take each chunk.
  std::chrono::milliseconds request_timeout{10000};
  std::chrono::milliseconds write_timeout{30000};
};

class StateDonor {
 public:
  // Registers options.method on `node` (replacing any handler of that name). The donor may be
  // destroyed before the node: its handler then answers UNAVAILABLE. Fails with INVALID_ARGUMENT
  // for bad options.
  static Result<std::unique_ptr<StateDonor>> Create(net::Node& node,
                                                    StateDonorOptions options = {});
  ~StateDonor();

  StateDonor(const StateDonor&) = delete;
  StateDonor& operator=(const StateDonor&) = delete;

  // Makes `snapshot` the state served to downloads that start from now on. Its payloads are
  // shared, not copied (use StateTensor::Copy for bytes the trainer keeps changing) and must not
  // change afterwards. Computes the chunk checksums on this thread (BLAKE2b, about 1 GB/s).
  // `version` must be positive and greater than every version published before
  // (FAILED_PRECONDITION otherwise): downloaders resume across donors by (version, digest).
  Status Publish(StateSnapshot snapshot, uint64_t version);

  // What to advertise; nullopt before the first Publish.
  std::optional<StateDonorInfo> Info() const;
  // One refresh of this donor's DHT entry (AdvertiseStateDonor with Info()). FAILED_PRECONDITION
  // before the first Publish.
  Status Advertise(dht::DhtRunner& dht, const std::string& prefix, std::chrono::seconds ttl) const;

  uint64_t version() const;  // 0 before the first Publish
  int active_downloads() const;

  struct Shared;

 private:
  explicit StateDonor(std::shared_ptr<Shared> shared);
  std::shared_ptr<Shared> shared_;
};

}  // namespace hivemind::averaging
