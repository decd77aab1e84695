#include "averaging/state_download.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <utility>

#include "averaging/state_transfer_wire.h"
#include "common/logging.h"

namespace hivemind::averaging {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// The content being assembled: what the first donor's manifest promised, the buffers, and how much
// of the byte stream is verified. It outlives the donor that started it, which is what makes
// resumption possible.
struct Download {
  wire::StateManifest manifest;
  std::unique_ptr<state_wire::ByteLayout> layout;
  std::vector<net::Payload> buffers;  // one per segment: metadata, then each tensor
  uint64_t verified = 0;

  bool complete() const { return verified == manifest.total_bytes(); }
  // Whether a donor advertising (version, digest) could continue this download.
  bool Accepts(const StateDonorInfo& donor) const {
    if (donor.version == 0) return true;  // unknown until asked
    return donor.version == manifest.version() &&
           (donor.digest.empty() || donor.digest == manifest.digest());
  }
};

enum class Outcome { kDone, kFailed, kOtherVersion };

class Downloader {
 public:
  Downloader(net::Node& node, const StateDownloadOptions& options)
      : node_(node), options_(options), deadline_(Clock::now() + options.timeout) {}

  Result<DownloadedState> Run(std::vector<StateDonorInfo> donors);

 private:
  milliseconds Remaining() const {
    return std::max(milliseconds(0),
                    std::chrono::duration_cast<milliseconds>(deadline_ - Clock::now()));
  }
  Status DeadlineStatus() const {
    return Status(StatusCode::kDeadlineExceeded, "the state download's timeout (" +
                                                     std::to_string(options_.timeout.count()) +
                                                     " ms) passed");
  }
  // The next message from the donor, waiting at most message_timeout and what is left of the
  // download's timeout. The stream is cancelled when the wait runs out.
  Result<std::optional<net::Message>> Read(net::Stream& stream, const char* what);
  Outcome TryDonor(const StateDonorInfo& donor, StateDonorAttempt& attempt);
  // Checks one chunk message and copies its bytes into place; PROTOCOL_ERROR for bad data.
  Status AcceptChunk(const net::Message& message, StateDonorAttempt& attempt);
  DownloadedState Finish(std::vector<StateDonorAttempt> attempts);

  net::Node& node_;
  const StateDownloadOptions& options_;
  const Clock::time_point deadline_;
  std::unique_ptr<Download> download_;
  uint64_t bytes_received_ = 0;
  int restarts_ = 0;
};

Result<std::optional<net::Message>> Downloader::Read(net::Stream& stream, const char* what) {
  milliseconds wait = std::min(options_.message_timeout, Remaining());
  auto next = stream.Read().WaitFor(wait);
  if (!next) {
    stream.Cancel();
    if (wait < options_.message_timeout) return DeadlineStatus();
    return Status(StatusCode::kDeadlineExceeded, std::string("no ") + what +
                                                     " within message_timeout (" +
                                                     std::to_string(wait.count()) + " ms)");
  }
  return *next;
}

Status Downloader::AcceptChunk(const net::Message& message, StateDonorAttempt& attempt) {
  wire::StateMessage header;
  if (!header.ParseFromString(message.header) || !header.has_chunk()) {
    return Status(StatusCode::kProtocolError, "expected a state chunk");
  }
  Download& download = *download_;
  const uint64_t total = download.manifest.total_bytes();
  const uint64_t chunk_bytes = download.manifest.chunk_bytes();
  const uint64_t offset = download.verified;
  const uint64_t length = std::min(chunk_bytes, total - offset);
  const uint64_t received = message.PayloadBytes();
  attempt.bytes_received += received;
  bytes_received_ += received;
  if (header.chunk().offset() != offset) {
    return Status(StatusCode::kProtocolError, "chunk at byte " +
                                                  std::to_string(header.chunk().offset()) +
                                                  ", expected byte " + std::to_string(offset));
  }
  const uint64_t index = offset / chunk_bytes;
  if (received != length) {
    return Status(StatusCode::kProtocolError, "chunk " + std::to_string(index) + " has " +
                                                  std::to_string(received) + " bytes, expected " +
                                                  std::to_string(length));
  }
  // Verify before copying, so the buffers only ever hold verified bytes.
  state_wire::Blake2b hash;
  for (const auto& payload : message.payloads) hash.Update(payload.data(), payload.size());
  if (hash.Final() != download.manifest.chunk_checksums(static_cast<int>(index))) {
    return Status(StatusCode::kProtocolError,
                  "chunk " + std::to_string(index) + " (bytes " + std::to_string(offset) + ".." +
                      std::to_string(offset + length) + ") failed its BLAKE2b checksum");
  }
  size_t payload = 0;
  uint64_t inside_payload = 0;
  download.layout->ForEachPiece(
      offset, length, [&](size_t segment, uint64_t inside, uint64_t size) {
        uint8_t* destination = download.buffers[segment].mutable_data() + inside;
        while (size > 0) {
          const auto& source = message.payloads[payload];
          uint64_t take = std::min<uint64_t>(size, source.size() - inside_payload);
          std::memcpy(destination, source.data() + inside_payload, take);
          destination += take;
          size -= take;
          inside_payload += take;
          if (inside_payload == source.size()) {
            ++payload;
            inside_payload = 0;
          }
        }
      });
  download.verified += length;
  attempt.bytes_verified += length;
  return Status::Ok();
}

Outcome Downloader::TryDonor(const StateDonorInfo& donor, StateDonorAttempt& attempt) {
  attempt.peer = donor.address.peer_id;
  attempt.start_offset = download_ ? download_->verified : 0;
  if (Remaining().count() == 0) {
    attempt.status = DeadlineStatus();
    return Outcome::kFailed;
  }
  auto stream = node_.OpenStream(donor.address, options_.method, net::CallOptions{Remaining()});
  auto fail = [&](Status status) {
    stream->Cancel();  // the donor stops sending at once
    attempt.status = std::move(status);
    return Outcome::kFailed;
  };

  wire::StateRequest request;
  if (download_) {
    request.set_version(download_->manifest.version());
    request.set_digest(download_->manifest.digest());
    request.set_offset(download_->verified);
  }
  auto written = stream->Write(net::Message(request.SerializeAsString()))
                     .WaitFor(std::min(options_.message_timeout, Remaining()));
  if (!written)
    return fail(Status(StatusCode::kDeadlineExceeded, "the request was not sent in time"));
  if (!written->ok()) return fail(written->status());
  stream->CloseWrite();

  auto first = Read(*stream, "manifest");
  if (!first.ok()) {
    attempt.status = first.status();
    // NOT_FOUND: the donor is alive but serves other content; it may be used after a restart.
    if (download_ && first.status().code() == StatusCode::kNotFound) return Outcome::kOtherVersion;
    return fail(first.status());
  }
  if (!first->has_value()) {
    return fail(
        Status(StatusCode::kProtocolError, "the donor closed the stream without a manifest"));
  }
  wire::StateMessage message;
  if (!message.ParseFromString((*first)->header) || !message.has_manifest()) {
    return fail(Status(StatusCode::kProtocolError, "the donor's first message is not a manifest"));
  }
  Status valid = state_wire::ValidateManifest(message.manifest(), options_.max_total_bytes);
  if (!valid.ok()) return fail(valid);
  attempt.version = message.manifest().version();
  if (download_) {
    if (message.manifest().version() != download_->manifest.version() ||
        message.manifest().digest() != download_->manifest.digest()) {
      fail(Status(StatusCode::kFailedPrecondition,
                  "served version " + std::to_string(message.manifest().version()) +
                      " instead of " + std::to_string(download_->manifest.version())));
      return Outcome::kOtherVersion;
    }
  } else {
    auto download = std::make_unique<Download>();
    download->manifest = std::move(*message.mutable_manifest());
    std::vector<uint64_t> sizes{download->manifest.metadata_size()};
    for (const auto& tensor : download->manifest.tensors()) sizes.push_back(tensor.size_bytes());
    for (uint64_t size : sizes) download->buffers.push_back(net::Payload::Allocate(size));
    download->layout = std::make_unique<state_wire::ByteLayout>(std::move(sizes));
    download_ = std::move(download);
  }

  while (!download_->complete()) {
    auto next = Read(*stream, "chunk");
    if (!next.ok()) return fail(next.status());
    if (!next->has_value()) {
      return fail(Status(StatusCode::kProtocolError,
                         "the donor ended the stream at byte " +
                             std::to_string(download_->verified) + " of " +
                             std::to_string(download_->manifest.total_bytes())));
    }
    Status accepted = AcceptChunk(**next, attempt);
    if (!accepted.ok()) return fail(accepted);
    if (options_.on_progress) {
      options_.on_progress(StateDownloadProgress{attempt.peer, download_->manifest.version(),
                                                 download_->verified,
                                                 download_->manifest.total_bytes()});
    }
  }
  attempt.status = Status::Ok();
  return Outcome::kDone;
}

DownloadedState Downloader::Finish(std::vector<StateDonorAttempt> attempts) {
  DownloadedState result;
  const auto& manifest = download_->manifest;
  result.version = manifest.version();
  result.digest = manifest.digest();
  result.snapshot.metadata = download_->buffers[0].ToString();
  for (int i = 0; i < manifest.tensors_size(); ++i) {
    const auto& info = manifest.tensors(i);
    result.snapshot.tensors.push_back(StateTensor{
        info.name(), info.dtype(), std::vector<int64_t>(info.shape().begin(), info.shape().end()),
        std::move(download_->buffers[static_cast<size_t>(i) + 1])});
  }
  result.attempts = std::move(attempts);
  result.bytes_received = bytes_received_;
  result.restarts = restarts_;
  return result;
}

Result<DownloadedState> Downloader::Run(std::vector<StateDonorInfo> donors) {
  std::deque<StateDonorInfo> queue;
  for (auto& donor : donors) {
    if (donor.address.peer_id == node_.peer_id()) continue;
    bool seen = std::any_of(queue.begin(), queue.end(), [&](const StateDonorInfo& other) {
      return other.address.peer_id == donor.address.peer_id;
    });
    if (!seen) queue.push_back(std::move(donor));
  }
  if (queue.empty()) {
    return Status(StatusCode::kNotFound, "no state donor to download from");
  }

  std::vector<StateDonorAttempt> attempts;
  std::vector<StateDonorInfo> other_version;
  bool timed_out = false;
  while (true) {
    if (queue.empty()) {
      if (!download_ || other_version.empty() || restarts_ >= options_.max_restarts) break;
      // Nobody left serves the content half-downloaded: start over with what the others serve.
      HM_LOG(kWarning) << "no donor left serving state version " << download_->manifest.version()
                       << " (verified " << download_->verified << " of "
                       << download_->manifest.total_bytes() << " bytes); starting over with "
                       << other_version.size() << " donor(s) serving another version";
      ++restarts_;
      download_.reset();
      std::stable_sort(
          other_version.begin(), other_version.end(),
          [](const StateDonorInfo& a, const StateDonorInfo& b) { return a.version > b.version; });
      queue.assign(other_version.begin(), other_version.end());
      other_version.clear();
      continue;
    }
    if (Remaining().count() == 0) {
      timed_out = true;
      break;
    }
    auto pick = queue.begin();
    if (download_) {
      pick = std::find_if(queue.begin(), queue.end(),
                          [&](const StateDonorInfo& donor) { return download_->Accepts(donor); });
      if (pick == queue.end()) {  // every remaining donor advertises other content
        other_version.insert(other_version.end(), queue.begin(), queue.end());
        queue.clear();
        continue;
      }
    }
    StateDonorInfo donor = std::move(*pick);
    queue.erase(pick);
    attempts.emplace_back();
    Outcome outcome = TryDonor(donor, attempts.back());
    if (outcome == Outcome::kDone) return Finish(std::move(attempts));
    HM_LOG(kInfo) << "state download from " << donor.address.peer_id.ShortString()
                  << " failed: " << attempts.back().status.ToString();
    if (attempts.back().status.code() == StatusCode::kDeadlineExceeded &&
        Remaining().count() == 0) {
      timed_out = true;
      break;
    }
    if (outcome == Outcome::kOtherVersion) other_version.push_back(std::move(donor));
  }

  std::string message =
      "state download failed after trying " + std::to_string(attempts.size()) + " donor(s)";
  if (download_) {
    message += " (verified " + std::to_string(download_->verified) + " of " +
               std::to_string(download_->manifest.total_bytes()) + " bytes of version " +
               std::to_string(download_->manifest.version()) + ")";
  }
  if (restarts_ > 0) message += ", after starting over " + std::to_string(restarts_) + " time(s)";
  if (timed_out)
    message += "; the timeout (" + std::to_string(options_.timeout.count()) + " ms) passed";
  message += ":";
  for (const auto& attempt : attempts) {
    message += " [" + attempt.peer.ToString() + ": " + attempt.status.ToString() + "]";
  }
  if (attempts.empty() && !other_version.empty()) {
    message += " every donor serves another version than the one requested";
  }
  return Status(timed_out ? StatusCode::kDeadlineExceeded : StatusCode::kUnavailable, message);
}

}  // namespace

Result<DownloadedState> DownloadState(net::Node& node, std::vector<StateDonorInfo> donors,
                                      const StateDownloadOptions& options) {
  return Downloader(node, options).Run(std::move(donors));
}

Result<DownloadedState> DownloadStateFromDht(net::Node& node, dht::DhtRunner& dht,
                                             const std::string& prefix,
                                             const StateDownloadOptions& options) {
  auto donors = FindStateDonors(dht, prefix);
  if (!donors.ok()) return donors.status();
  if (donors->empty()) {
    return Status(StatusCode::kNotFound,
                  "no state donor advertises under DHT key '" + StateDirectoryKey(prefix) + "'");
  }
  return DownloadState(node, std::move(donors).value(), options);
}

}  // namespace hivemind::averaging
