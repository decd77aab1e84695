#include "averaging/state_donor.h"

#include <atomic>
#include <mutex>
#include <utility>
#include <vector>

#include "averaging/state_transfer_wire.h"
#include "common/logging.h"

namespace hivemind::averaging {

namespace {

// Below the transport's default max_header_bytes (4 MiB), with room for the envelope.
constexpr size_t kMaxManifestBytes = (size_t{4} << 20) - (size_t{64} << 10);

// One published snapshot with everything needed to serve it. Immutable once built; downloads hold
// it by shared_ptr, so it lives until the last download reading it ends.
struct Published {
  uint64_t version = 0;
  StateSnapshot snapshot;
  net::Payload metadata;               // the metadata as a shareable payload (segment 0)
  std::vector<net::Payload> segments;  // metadata, then each tensor
  std::unique_ptr<state_wire::ByteLayout> layout;
  wire::StateManifest manifest;
  std::string manifest_message;  // serialized StateMessage{manifest}, sent to every download
};

}  // namespace

struct StateDonor::Shared {
  StateDonorOptions options;
  net::PeerId peer_id;
  net::PeerAddress address;

  mutable std::mutex mutex;
  std::shared_ptr<const Published> current;
  // Snapshots replaced by newer ones but still held by a download in progress: a download that
  // lost its donor may resume here as long as one of them is alive, at no extra memory cost.
  std::vector<std::weak_ptr<const Published>> previous;
  uint64_t last_version = 0;

  std::atomic<int> active{0};
  std::atomic<bool> stopped{false};

  // The snapshot a request asks for, or why it cannot be served.
  Result<std::shared_ptr<const Published>> Find(const wire::StateRequest& request) const {
    std::lock_guard<std::mutex> lock(mutex);
    if (!current) {
      return Status(StatusCode::kFailedPrecondition,
                    "state donor " + peer_id.ShortString() + " has published no state yet");
    }
    if (request.version() == 0) return current;
    std::vector<std::shared_ptr<const Published>> candidates{current};
    for (const auto& weak : previous) {
      if (auto alive = weak.lock()) candidates.push_back(std::move(alive));
    }
    for (auto& candidate : candidates) {
      if (candidate->version != request.version()) continue;
      if (!request.digest().empty() && request.digest() != candidate->manifest.digest()) {
        return Status(StatusCode::kNotFound,
                      "state donor " + peer_id.ShortString() + " has version " +
                          std::to_string(request.version()) + " with other content (digest " +
                          state_wire::ShortHex(candidate->manifest.digest()) + ", asked for " +
                          state_wire::ShortHex(request.digest()) + ")");
      }
      return candidate;
    }
    return Status(StatusCode::kNotFound, "state donor " + peer_id.ShortString() +
                                             " does not serve version " +
                                             std::to_string(request.version()) + " (it serves " +
                                             std::to_string(current->version) + ")");
  }

  Status Serve(const net::CallContext& context, net::Stream& stream);
};

namespace {

// Counts a download for as long as it is served.
class ActiveDownload {
 public:
  explicit ActiveDownload(std::atomic<int>& active) : active_(active) { count_ = ++active_; }
  ~ActiveDownload() { --active_; }
  int count() const { return count_; }

 private:
  std::atomic<int>& active_;
  int count_;
};

Status WaitWrite(net::Stream& stream, net::Message message, std::chrono::milliseconds timeout) {
  auto written = stream.Write(std::move(message)).WaitFor(timeout);
  if (!written) {
    stream.Cancel();
    return Status(StatusCode::kDeadlineExceeded,
                  "the downloader took no data for " + std::to_string(timeout.count()) + " ms");
  }
  return written->status();
}

}  // namespace

Status StateDonor::Shared::Serve(const net::CallContext& context, net::Stream& stream) {
  ActiveDownload download(active);
  if (stopped.load()) {
    return Status(StatusCode::kUnavailable, "state donor " + peer_id.ShortString() + " stopped");
  }
  if (download.count() > options.max_concurrent_downloads) {
    return Status(StatusCode::kResourceExhausted,
                  "state donor " + peer_id.ShortString() + " already serves " +
                      std::to_string(options.max_concurrent_downloads) +
                      " downloads (max_concurrent_downloads); try another donor");
  }

  auto first = stream.Read().WaitFor(options.request_timeout);
  if (!first) {
    return Status(
        StatusCode::kDeadlineExceeded,
        "no state request within " + std::to_string(options.request_timeout.count()) + " ms");
  }
  if (!first->ok()) return first->status();
  if (!first->value().has_value()) {
    return Status(StatusCode::kInvalidArgument, "the stream closed before a state request");
  }
  wire::StateRequest request;
  if (!request.ParseFromString(first->value()->header)) {
    return Status(StatusCode::kInvalidArgument, "malformed StateRequest");
  }
  auto found = Find(request);
  if (!found.ok()) return found.status();
  std::shared_ptr<const Published> published = std::move(found).value();
  const uint64_t total = published->layout->total();
  const uint64_t chunk = published->manifest.chunk_bytes();
  if (request.offset() > total || request.offset() % chunk != 0) {
    return Status(StatusCode::kInvalidArgument, "offset " + std::to_string(request.offset()) +
                                                    " is not a chunk boundary within " +
                                                    std::to_string(total) + " bytes (chunks of " +
                                                    std::to_string(chunk) + ")");
  }
  HM_LOG(kDebug) << "state donor " << peer_id.ShortString() << " serves version "
                 << published->version << " from byte " << request.offset() << " to "
                 << context.peer.ShortString();

  Status status =
      WaitWrite(stream, net::Message(published->manifest_message), options.write_timeout);
  if (!status.ok()) return status;
  // The payloads keep the whole snapshot alive until the transport has sent them, however long
  // after this handler ends that is.
  std::shared_ptr<const void> owner = published;
  for (uint64_t offset = request.offset(); offset < total; offset += chunk) {
    if (stopped.load()) {
      return Status(StatusCode::kUnavailable, "state donor " + peer_id.ShortString() + " stopped");
    }
    if (context.IsCancelled()) return Status(StatusCode::kCancelled, "the downloader went away");
    wire::StateMessage header;
    header.mutable_chunk()->set_offset(offset);
    net::Message message(header.SerializeAsString());
    published->layout->ForEachPiece(
        offset, std::min(chunk, total - offset),
        [&](size_t segment, uint64_t inside, uint64_t size) {
          message.payloads.emplace_back(published->segments[segment].data() + inside, size, owner);
        });
    status = WaitWrite(stream, std::move(message), options.write_timeout);
    if (!status.ok()) return status;
  }
  return Status::Ok();
}

Result<std::unique_ptr<StateDonor>> StateDonor::Create(net::Node& node, StateDonorOptions options) {
  if (options.method.empty()) {
    return Status(StatusCode::kInvalidArgument, "StateDonorOptions::method is empty");
  }
  if (options.chunk_bytes < state_wire::kMinChunkBytes ||
      options.chunk_bytes > state_wire::kMaxChunkBytes) {
    return Status(StatusCode::kInvalidArgument,
                  "StateDonorOptions::chunk_bytes must be within [" +
                      std::to_string(state_wire::kMinChunkBytes) + ", " +
                      std::to_string(state_wire::kMaxChunkBytes) + "], got " +
                      std::to_string(options.chunk_bytes));
  }
  if (options.max_concurrent_downloads < 1) {
    return Status(StatusCode::kInvalidArgument,
                  "StateDonorOptions::max_concurrent_downloads must be at least 1");
  }
  auto shared = std::make_shared<Shared>();
  shared->options = std::move(options);
  shared->peer_id = node.peer_id();
  shared->address = node.visible_address();
  // The handler holds the shared state, not the donor: the node may call it after the donor is
  // gone, and then it answers UNAVAILABLE.
  node.RegisterStream(shared->options.method,
                      [shared](const net::CallContext& context, net::Stream& stream) {
                        return shared->Serve(context, stream);
                      });
  return std::unique_ptr<StateDonor>(new StateDonor(shared));
}

StateDonor::StateDonor(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {}

StateDonor::~StateDonor() {
  shared_->stopped.store(true);
  std::lock_guard<std::mutex> lock(shared_->mutex);
  shared_->current.reset();
  shared_->previous.clear();
}

Status StateDonor::Publish(StateSnapshot snapshot, uint64_t version) {
  if (version == 0) return Status(StatusCode::kInvalidArgument, "state version 0 is reserved");
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    if (version <= shared_->last_version) {
      return Status(StatusCode::kFailedPrecondition,
                    "state version " + std::to_string(version) + " is not above the last one (" +
                        std::to_string(shared_->last_version) + ")");
    }
  }
  auto published = std::make_shared<Published>();
  published->version = version;
  published->snapshot = std::move(snapshot);
  published->metadata = net::Payload::FromString(std::move(published->snapshot.metadata));
  published->segments.push_back(published->metadata);
  std::vector<uint64_t> sizes{published->metadata.size()};
  auto& manifest = published->manifest;
  manifest.set_version(version);
  manifest.set_metadata_size(published->metadata.size());
  for (const auto& tensor : published->snapshot.tensors) {
    published->segments.push_back(tensor.data);
    sizes.push_back(tensor.data.size());
    auto* info = manifest.add_tensors();
    info->set_name(tensor.name);
    info->set_dtype(tensor.dtype);
    for (int64_t dim : tensor.shape) info->add_shape(dim);
    info->set_size_bytes(tensor.data.size());
  }
  published->layout = std::make_unique<state_wire::ByteLayout>(std::move(sizes));
  const uint64_t total = published->layout->total();
  const uint64_t chunk = shared_->options.chunk_bytes;
  manifest.set_total_bytes(total);
  manifest.set_chunk_bytes(chunk);
  // Checksums are computed here, once, rather than per download: serving is then pure I/O.
  for (uint64_t offset = 0; offset < total; offset += chunk) {
    state_wire::Blake2b hash;
    published->layout->ForEachPiece(offset, std::min(chunk, total - offset),
                                    [&](size_t segment, uint64_t inside, uint64_t size) {
                                      hash.Update(published->segments[segment].data() + inside,
                                                  size);
                                    });
    manifest.add_chunk_checksums(hash.Final());
  }
  manifest.set_digest(state_wire::ManifestDigest(manifest));
  wire::StateMessage message;
  *message.mutable_manifest() = manifest;
  published->manifest_message = message.SerializeAsString();
  // The manifest travels as a message header, which the transport caps (max_header_bytes, 4 MiB
  // by default): about 30 bytes per chunk, so a huge state needs bigger chunks.
  if (published->manifest_message.size() > kMaxManifestBytes) {
    return Status(StatusCode::kResourceExhausted,
                  "the state's manifest would take " +
                      std::to_string(published->manifest_message.size()) + " bytes (more than " +
                      std::to_string(kMaxManifestBytes) +
                      "): " + std::to_string(manifest.chunk_checksums_size()) +
                      " chunks; use a larger StateDonorOptions::chunk_bytes");
  }

  std::lock_guard<std::mutex> lock(shared_->mutex);
  if (version <= shared_->last_version) {  // a concurrent Publish won meanwhile
    return Status(StatusCode::kFailedPrecondition, "state version " + std::to_string(version) +
                                                       " is not above the last one (" +
                                                       std::to_string(shared_->last_version) + ")");
  }
  if (shared_->current) shared_->previous.push_back(shared_->current);
  std::vector<std::weak_ptr<const Published>> alive;
  for (auto& weak : shared_->previous) {
    if (!weak.expired()) alive.push_back(std::move(weak));
  }
  shared_->previous = std::move(alive);
  shared_->current = std::move(published);
  shared_->last_version = version;
  return Status::Ok();
}

std::optional<StateDonorInfo> StateDonor::Info() const {
  std::lock_guard<std::mutex> lock(shared_->mutex);
  if (!shared_->current) return std::nullopt;
  StateDonorInfo info;
  info.address = shared_->address;
  info.version = shared_->current->version;
  info.digest = shared_->current->manifest.digest();
  info.total_bytes = shared_->current->layout->total();
  info.active_downloads = static_cast<uint32_t>(std::max(0, shared_->active.load()));
  return info;
}

Status StateDonor::Advertise(dht::DhtRunner& dht, const std::string& prefix,
                             std::chrono::seconds ttl) const {
  auto info = Info();
  if (!info) {
    return Status(StatusCode::kFailedPrecondition, "nothing to advertise: no state published yet");
  }
  return AdvertiseStateDonor(dht, prefix, *info, ttl);
}

uint64_t StateDonor::version() const {
  std::lock_guard<std::mutex> lock(shared_->mutex);
  return shared_->current ? shared_->current->version : 0;
}

int StateDonor::active_downloads() const { return shared_->active.load(); }

}  // namespace hivemind::averaging
