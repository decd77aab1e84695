#include "averaging/allreduce.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <tuple>
#include <utility>

#include "averaging/buffer_pool.h"
#include "averaging/reduce_kernels.h"
#include "common/logging.h"
#include "proto/averaging.pb.h"

namespace hivemind::averaging {

namespace {

namespace wire = ::hivemind::averaging::wire;
using Clock = std::chrono::steady_clock;
using Millis = std::chrono::milliseconds;
using net::Message;
using net::Payload;
using net::Stream;
using ReadFuture = Future<std::optional<Message>>;

Message Encode(const wire::AveragingHeader& header, std::vector<Payload> payloads = {}) {
  return Message(header.SerializeAsString(), std::move(payloads));
}

// The floats of a payload. Received single-chunk payloads are 8-byte aligned and local ones come
// from std::vector<float>, but a copy keeps an odd buffer from becoming undefined behaviour.
const float* FloatsOf(const Payload& payload, std::vector<float>& scratch) {
  if (reinterpret_cast<uintptr_t>(payload.data()) % alignof(float) == 0) {
    return reinterpret_cast<const float*>(payload.data());
  }
  scratch.resize(payload.size() / sizeof(float));
  std::memcpy(scratch.data(), payload.data(), scratch.size() * sizeof(float));
  return scratch.data();
}

bool PayloadFinite(const Payload& payload) {
  return AllFinite(payload.data(), payload.size() / sizeof(float));
}

Status Refused(const std::string& why) { return Status(StatusCode::kFailedPrecondition, why); }
Status Malformed(const std::string& why) { return Status(StatusCode::kInvalidArgument, why); }

// Errors a reducer returns on purpose to a sender it refuses (rather than errors of a dead or
// unreachable reducer): the sender must not treat them as the reducer's failure.
// Why a member refuses a backup: it already follows a later backup of the same share.
constexpr char kFollowsLaterBackup[] = "was already taken over further down";

bool FollowsLaterBackup(const Status& status) {
  return status.code() == StatusCode::kFailedPrecondition &&
         status.message().find(kFollowsLaterBackup) != std::string::npos;
}

bool IsRefusal(const Status& status) {
  return status.code() == StatusCode::kFailedPrecondition ||
         status.code() == StatusCode::kInvalidArgument ||
         status.code() == StatusCode::kPermissionDenied;
}

// Only a transport-level failure counts as proof that a peer is gone. A timeout or a refusal may
// come from a slow or misbehaving peer that is still alive and may hold results others need.
bool ConfirmsDeath(const Status& status) { return status.code() == StatusCode::kUnavailable; }

// AllReduceOptions::direct_stream_bytes when unset, by whether the node encrypts.
constexpr size_t kDirectStreamBytesPlain = size_t{512} << 10;
constexpr size_t kDirectStreamBytesEncrypted = size_t{256} << 10;

// How long a DONE notice may take; a notice that fails only delays the release to grace_period.
constexpr Millis kDoneNoticeTimeout{5000};

std::string Ms(Millis duration) { return std::to_string(duration.count()) + " ms"; }

// One end of a stream that this peer reads from and writes to. The owning thread (a handler, the
// round's caller or a takeover job) does every Read and Write; other threads only queue results
// in `outbox` and read the flags, under the round's mutex.
struct Channel {
  std::shared_ptr<Stream> owned;  // streams this peer opened
  Stream* stream = nullptr;       // valid while the owner thread runs
  int member = -1;
  ReadFuture pending;
  bool read_ready = false;
  bool read_closed = false;
  std::deque<Message> outbox;
  int attempts = 0;  // streams opened for this channel (retries after a failed connect)
  // The local vector is not finite: the stream opens and closes with no part, so its reducer
  // excludes this member at once (a stream that breaks before any part could be a lost
  // connection, which the reducer gives time to come back).
  bool withhold = false;
  size_t received = 0;  // messages read so far
};

// The transport can fail a stream with UNAVAILABLE although the peer is alive (seen under load:
// two peers dialing each other at once, or a connect that times out). A stream that failed before
// anything arrived is therefore opened again, a bounded number of times, before the peer is
// treated as failed.
constexpr int kMaxStreamAttempts = 3;
bool ShouldRetry(const Status& status, const Channel& channel) {
  return status.code() == StatusCode::kUnavailable && channel.received == 0 &&
         channel.attempts < kMaxStreamAttempts;
}

enum class EntryKind { kNone, kContribution, kFinal, kAbsent };

// What one source gave for one part.
struct Entry {
  EntryKind kind = EntryKind::kNone;
  Payload values;
  double weight = 0;
  std::vector<int> contributors;  // kFinal only
  int reduced_by = -1;            // kFinal only
};

struct Source {
  bool expected = false;
  bool excluded = false;
  bool connected = false;
  bool done_reading = false;
  bool probing = false;        // a liveness ping to this sender is in flight
  int failed_probes = 0;       // consecutive pings that found it unreachable
  Clock::time_point probed{};  // when the last one was sent
  double weight = 0;
  size_t delivered = 0;
  Clock::time_point last_seen;
};

enum class PartState : uint8_t { kWaiting, kReducing, kDone, kAbandoned };

// A RESULT read by a direct stream's reader straight into the part's range of results_ (see
// Round::PlaceResult): at most once per part and round, so nothing else writes that range
// while a read into it runs, and a reducer cannot overwrite a part it already delivered.
enum class Placement : uint8_t { kNone, kReceiving, kReceived, kNonFinite, kBroken };

// The reduction of one share at one chain position (0: the original reducer; >0: a backup).
struct Reduction {
  int share = -1;
  size_t position = 0;
  size_t first_part = 0;
  Clock::time_point started;
  Clock::time_point deadline;
  std::vector<Source> sources;              // by member index
  std::vector<std::vector<Entry>> entries;  // [part within share][member]
  std::vector<PartState> state;
  size_t terminal = 0;
  std::map<int, std::shared_ptr<Channel>> sinks;  // who gets each RESULT
  bool finished() const { return terminal == state.size(); }
};

// A member's view of one part of the result.
struct PartView {
  bool final = false;
  Payload values;
  std::vector<int> contributors;
  int reduced_by = -1;
};

// Copies into a round's mirror of `mirror_bytes`: past the caches when it is large (the caller
// reads it only after the round, from memory anyway, and a plain copy first reads every line it
// writes), through them when it fits there (streamed, 4 MiB mirrors made c10d ops about 10 %
// slower: the next op read its tensor from memory).
constexpr size_t kStreamedMirrorBytes = size_t{8} << 20;
void CopyToMirror(const void* from, size_t bytes, void* to, size_t mirror_bytes) {
  if (mirror_bytes >= kStreamedMirrorBytes) {
    StreamingCopy(from, bytes, to);
  } else {
    std::memcpy(to, from, bytes);
  }
}

struct Computed {
  size_t k = 0;
  Payload values;
  std::vector<Payload> wire;  // what a RESULT carries
  bool raw = false;           // wire is `values` itself, not the round's encoding
  std::vector<int> contributors;
  int reduced_by = -1;
  std::vector<int> non_finite;  // contributors whose values were not finite: nothing was computed
  bool mirrored = false;        // also written to AllReduceOptions::mirror
};

}  // namespace

class Round;

class AllReduceService::Impl : public std::enable_shared_from_this<AllReduceService::Impl> {
 public:
  Impl(net::Node& node, AllReduceServiceOptions options)
      : node(node), options(options), pool(BufferPool::Create(4, options.pooled_bytes)) {}

  Status Serve(const net::CallContext& context, Stream& stream, wire::Kind expected);
  Status Register(const std::shared_ptr<Round>& round);
  // A registered round has finished and holds `bytes` for its grace period, or less: it is
  // released as soon as every other member said it is done with the round too (MemberDone).
  void Finished(const std::shared_ptr<Round>& round, size_t bytes);
  // Handles another member's DONE notice for one of our rounds.
  Status MemberDone(const wire::AveragingHeader& notice, const net::PeerId& peer);
  // Releases the rounds past their grace period or beyond grace_bytes (and their buffers).
  void Sweep() {
    std::lock_guard<std::mutex> lock(mutex_);
    SweepLocked();
  }
  std::shared_ptr<Round> WaitForRound(const std::string& id, Clock::time_point deadline);
  size_t KeptRounds() {
    std::lock_guard<std::mutex> lock(mutex_);
    return rounds_.size();
  }
  void Spawn(std::function<void()> task);
  void Stop();

  std::string Method(const char* name) const { return options.method_prefix + "." + name; }

  net::Node& node;
  const AllReduceServiceOptions options;
  const std::shared_ptr<BufferPool> pool;

 private:
  void SweepLocked();
  // Drops a round now (it may not be in finished_ yet); its id stays refused for grace_period.
  void ReleaseLocked(const std::string& id);

  std::mutex mutex_;
  std::condition_variable registered_;
  std::map<std::string, std::shared_ptr<Round>> rounds_;
  // Finished rounds in the order they finished, and what they hold: sweeping looks at the oldest
  // only (a fast DDP run finishes hundreds of rounds a second).
  struct FinishedRound {
    Clock::time_point at;
    std::string id;
    size_t bytes = 0;
  };
  std::deque<FinishedRound> finished_;
  size_t finished_bytes_ = 0;
  // Rounds released by DONE notices, dropped at the next sweep: a notice's handler runs on the
  // node's worker pool, which must not run a round's destructor (it ends streams and frees
  // buffers; rounds end on the threads that run them, or at Stop).
  std::vector<std::shared_ptr<Round>> retired_;
  // Rounds released before their grace period ended: refused at once, not waited for.
  std::set<std::string> released_;
  std::deque<std::pair<Clock::time_point, std::string>> released_order_;
  bool stopping_ = false;

  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex workers_mutex_;
  std::list<Worker> workers_;
  bool workers_closed_ = false;
};

// One all-reduce round as seen by one member: its view of the result, the reductions it runs, and
// the streams it serves. Lives until the round finished and its grace period passed, and as long
// as any thread still uses it.
class Round : public std::enable_shared_from_this<Round> {
 public:
  Round(AllReduceService::Impl& service, const Group& group, Partition partition, PartCodec codec,
        const AllReduceOptions& options, double weight)
      : service_(service.weak_from_this()),
        node_(service.node),
        methods_{service.Method("allreduce"), service.Method("collect"), service.Method("takeover"),
                 service.Method("ping"), service.Method("done")},
        group_(group),
        partition_(std::move(partition)),
        codec_(std::move(codec)),
        options_(options),
        digest_(group.Digest() + partition_.Digest()),
        me_(group.my_index),
        n_(static_cast<int>(group.members.size())),
        contributes_(group.members[group.my_index].contributes()),
        weight_(weight),
        reducer_order_(group.ReducerOrder()) {
    start_ = Clock::now();
    deadline_ = start_ + options.timeout;
    view_.resize(partition_.parts().size());
    placement_.assign(partition_.parts().size(), Placement::kNone);
    owner_pos_.assign(n_, 0);
    progress_.assign(n_, start_);
    if (contributes_ && options.mirror_elements > 0) mirror_ = options.mirror;
    mirrored_.assign(partition_.parts().size(), false);
  }

  const std::string& id() const { return group_.id; }
  void Stop() {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    cv_.notify_all();
  }

  Result<SharedMean> Run(std::vector<float>& data);
  // Gives the caller back the input's storage once every part is final, when nothing else holds
  // it any more (else it goes to the pool when released). Clears input_.
  void GiveBackInputLocked(std::vector<float>& data);
  // Copies into results_ the final parts whose values live elsewhere (a takeover's result, or one
  // that arrived while this member was still reducing the part), so results_ is the whole mean.
  // First waits for this member's reductions still writing into results_.
  void GatherResults(std::unique_lock<std::mutex>& lock);
  Status ServeSender(const net::CallContext& context, Stream& stream,
                     const wire::AveragingHeader& open);
  Status ServeCollect(const net::CallContext& context, Stream& stream,
                      const wire::AveragingHeader& collect);
  Status ServeTakeover(Stream& stream, const wire::AveragingHeader& request);
  // Record that this member (once Run returned) or another one (its DONE notice, sent by `peer`)
  // will ask nothing more of this round. True once every member has.
  bool MarkSelfDone();
  Result<bool> MarkPeerDone(int member, const net::PeerId& peer, const std::string& digest);

 private:
  // After Run: hands the round to the service for its grace period, then tells every other
  // member that is not known dead that this one is done (see MarkPeerDone).
  void Ended(size_t bytes);
  enum Method { kAllReduce, kCollect, kTakeover, kPing, kDone };

  // ---- helpers (the *Locked ones need mutex_) ----
  std::vector<int> Chain(int share) const {
    std::vector<int> chain = {share};
    auto it = std::find(reducer_order_.begin(), reducer_order_.end(), share);
    size_t at = it == reducer_order_.end() ? 0 : it - reducer_order_.begin();
    for (size_t i = 1; i < reducer_order_.size(); ++i) {
      int candidate = reducer_order_[(at + i) % reducer_order_.size()];
      if (candidate != share) chain.push_back(candidate);
    }
    return chain;
  }
  std::string Name(int member) const {
    return "member " + std::to_string(member) + " (" +
           group_.members[member].address.peer_id.ShortString() + ")";
  }
  void Notify(RoundEvent event, size_t part) {
    if (options_.observer) options_.observer(event, part);
  }
  void NoteFailureLocked(int member, const std::string& why, bool dead) {
    if (member == me_) return;
    if (dead) dead_.insert(member);
    if (failed_.insert(member).second) failures_.push_back(Name(member) + ": " + why);
  }
  bool ShareFinalLocked(int share) const {
    size_t first = partition_.first_part(share);
    for (size_t p = first; p < first + partition_.num_parts(share); ++p) {
      if (!view_[p].final) return false;
    }
    return true;
  }
  // Whether a reduction of this member's own share, or a placed read of a result, may be writing
  // part p's range of results_ now (any part, for kAnyPart): they write without the lock, so
  // nothing else may touch that range.
  static constexpr size_t kAnyPart = static_cast<size_t>(-1);
  bool ResultsBeingWrittenLocked(size_t p) const {
    if (p == kAnyPart ? receiving_ > 0 : placement_[p] == Placement::kReceiving) return true;
    if (!results_ || share_results_ != results_) return false;
    auto own = reductions_.find({me_, 0});
    if (own == reductions_.end()) return false;
    const Reduction& reduction = *own->second;
    for (size_t k = 0; k < reduction.state.size(); ++k) {
      if (p != kAnyPart && p != reduction.first_part + k) continue;
      if (reduction.state[k] == PartState::kReducing) return true;
    }
    return false;
  }
  void MirrorCopy(const void* from, size_t bytes, void* to) const {
    CopyToMirror(from, bytes, to, options_.mirror_elements * sizeof(float));
  }
  // How many of part p's elements AllReduceOptions::mirror covers (from the part's start).
  size_t MirroredElements(const Part& part) const {
    const size_t end = options_.mirror_elements;
    return part.begin >= end ? 0 : std::min(part.size, end - part.begin);
  }
  // Whether the caller's values in `share`'s range are finite (or the caller vouched for them).
  bool ShareInputFinite(int share) const {
    if (options_.input_checked || partition_.num_parts(share) == 0) return true;
    const size_t first = partition_.first_part(share);
    const Part& last = partition_.parts()[first + partition_.num_parts(share) - 1];
    const size_t begin = partition_.parts()[first].begin;
    return AllFinite(input_->data() + begin, last.begin + last.size - begin);
  }
  // Whether the caller's values in its own share's range are finite, as far as no reduction
  // with this member among the contributors has shown it: a part left without it (a backup
  // reduced it, or this member was excluded from it) is checked here. Run's caller.
  Status OwnShareInputFiniteLocked() const {
    if (options_.input_checked || !contributes_ || partition_.num_parts(me_) == 0) {
      return Status::Ok();
    }
    const size_t first = partition_.first_part(me_);
    for (size_t p = first; p < first + partition_.num_parts(me_); ++p) {
      const std::vector<int>& from = view_[p].contributors;
      if (std::find(from.begin(), from.end(), me_) != from.end()) continue;
      const Part& part = partition_.parts()[p];
      if (!AllFinite(input_->data() + part.begin, part.size)) {
        return Status(StatusCode::kInvalidArgument,
                      "the local vector has non-finite values (in elements [" +
                          std::to_string(part.begin) + ", " +
                          std::to_string(part.begin + part.size) + "))");
      }
    }
    return Status::Ok();
  }
  size_t ShareElements(int share) const {
    if (partition_.num_parts(share) == 0) return 0;
    const size_t first = partition_.first_part(share);
    const Part& last = partition_.parts()[first + partition_.num_parts(share) - 1];
    return last.begin + last.size - partition_.parts()[first].begin;
  }
  std::string ShareSpan(int share) const {
    const size_t first = partition_.first_part(share);
    const Part& last = partition_.parts()[first + partition_.num_parts(share) - 1];
    return "[" + std::to_string(partition_.parts()[first].begin) + ", " +
           std::to_string(last.begin + last.size) + ")";
  }
  bool DoneLocked() const {
    if (contributes_) {
      for (const auto& part : view_) {
        if (!part.final) return false;
      }
      return true;
    }
    auto own = reductions_.find({me_, 0});
    return own == reductions_.end() || own->second->finished() || owner_pos_[me_] != 0;
  }
  Status CheckHeader(const wire::AveragingHeader& header, const Stream& stream) const;
  // The header of a RESULT or forwarded final part; payloads are checked where they are decoded.
  Status CheckResult(const wire::AveragingHeader& header, int share) const;
  // Decodes and keeps a result from the share's owner at `position`; ignores one that is stale
  // (a later owner, or the part is already final). An error means the result was malformed.
  Status ApplyResultLocked(int share, size_t position, const wire::AveragingHeader& header,
                           const std::vector<Payload>& payloads);
  // ReceivePlacer of the stream to `share`'s reducer: a RESULT for a part that is neither final
  // nor placed before goes straight into results_ (no copy from a transport buffer), and is
  // checked by the reader thread while it is in its cache.
  std::shared_ptr<const net::ReceivePlacer> ResultPlacer(int share);
  // Also says where in the mirror the read's bytes go (null: nowhere) and how many of them.
  Payload PlaceResult(int share, const std::string& header_bytes, size_t index, size_t size,
                      uint8_t** mirror, size_t* mirror_bytes);
  void ResultPlaced(const Payload& buffer, bool complete, bool finite);
  void OwnerFailedLocked(int share, size_t position, const std::string& why, bool dead = false);
  void StartTakeoverLocked(int share, size_t position);
  void RunTakeover(std::shared_ptr<Reduction> reduction);
  void RequestTakeover(int share, size_t position);
  std::shared_ptr<Reduction> NewReductionLocked(int share, size_t position,
                                                Clock::time_point deadline);
  Entry LocalEntryLocked(size_t part) const;
  void DeliverLocked(Reduction& reduction, int member, size_t k, Entry entry);
  void ExcludeLocked(Reduction& reduction, int member, const std::string& why, bool dead);
  // Pings a sender that has not opened its stream yet; excludes it at once if it is unreachable.
  void ProbeSenderLocked(Source& source, int member, Clock::time_point now);
  void SendProbe(int member);
  void Pump(std::unique_lock<std::mutex>& lock, Reduction& reduction);
  // Ends the waiting parts of reductions of `share` that this peer no longer owns.
  void AbandonLocked(int share);
  Computed Compute(const Reduction& reduction, size_t k, const std::vector<Entry>& entries) const;
  void ArmRead(const std::shared_ptr<Channel>& channel);
  void OpenSenderStream(int share, const std::shared_ptr<Channel>& channel);
  void CheckTimersLocked(Clock::time_point now);
  Status HandleForward(Reduction& reduction, int member, const Message& message);

  std::weak_ptr<AllReduceService::Impl> service_;
  net::Node& node_;
  const std::string methods_[5];
  std::vector<int> probes_due_;  // senders to ping once the lock is released
  const Group group_;
  const Partition partition_;
  const PartCodec codec_;
  const AllReduceOptions options_;
  const std::string digest_;
  const int me_;
  const int n_;
  const bool contributes_;
  const double weight_;
  const std::vector<int> reducer_order_;
  Clock::time_point start_, deadline_;
  // The caller's vector, taken over for the round (no copy; contributors only). Nobody writes it
  // while it is shared: the transport may be sending it. Once every part is final nothing reads
  // it, and it goes back to the caller, unless the round failed (then backups may still collect
  // it during the grace period, and the caller gets a copy back).
  std::shared_ptr<std::vector<float>> input_;
  // A contributor's whole mean (pooled): its own share reduced in place, the others' shares
  // decoded into it as they arrive. Shared read-only with the caller once the round is done, and
  // kept for takeovers during the grace period. share_results_ is where this member reduces its
  // own share (starting at element share_results_base_): results_ itself, or for an auxiliary
  // member a pooled buffer of the share's size.
  std::shared_ptr<std::vector<float>> share_results_;
  size_t share_results_base_ = 0;
  std::shared_ptr<std::vector<float>> results_;
  // AllReduceOptions::mirror while the round runs (contributors only); null once Run is about to
  // return, so that writers starting later leave it alone. mirrored_[p]: part p's final values
  // are there already (from its placed read or this member's reduction), so the round's end
  // need not copy them.
  float* mirror_ = nullptr;
  std::vector<bool> mirrored_;

  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<PartView> view_;
  std::vector<Placement> placement_;         // by part
  size_t receiving_ = 0;                     // parts in Placement::kReceiving
  std::vector<size_t> owner_pos_;            // by share: the chain position this peer trusts
  std::vector<Clock::time_point> progress_;  // by share: last result or owner change
  std::set<int> dead_;                       // members known dead (not merely excluded)
  std::set<int> failed_;                     // dead or excluded, for the report
  std::vector<std::string> failures_;
  std::optional<Status> fatal_;
  std::map<std::pair<int, size_t>, std::shared_ptr<Reduction>> reductions_;
  std::vector<std::shared_ptr<Channel>> channels_;           // kept alive with the round
  std::map<int, std::shared_ptr<Channel>> sender_channels_;  // by share, read by Run()
  std::set<int> done_;  // members that will ask nothing more of this round
  bool stopping_ = false;
  int takeovers_ = 0;

  friend class AllReduceService::Impl;
};

// ---------------------------------------------------------------------------------------------
// Validation

Status Round::CheckHeader(const wire::AveragingHeader& header, const Stream& stream) const {
  if (header.group_digest() != digest_) {
    return Refused("group description differs (members, modes, bandwidths or their split)");
  }
  if (header.sender() >= static_cast<uint32_t>(n_)) {
    return Malformed("sender index " + std::to_string(header.sender()) + " out of range");
  }
  int sender = static_cast<int>(header.sender());
  if (sender == me_) return Malformed("a stream from myself");
  if (stream.peer() != group_.members[sender].address.peer_id) {
    return Status(StatusCode::kPermissionDenied,
                  "peer " + stream.peer().ShortString() + " claims to be " + Name(sender));
  }
  return Status::Ok();
}

Status Round::CheckResult(const wire::AveragingHeader& header, int share) const {
  size_t first = partition_.first_part(share);
  if (header.part() < first || header.part() >= first + partition_.num_parts(share)) {
    return Malformed("part " + std::to_string(header.part()) + " is not in the share of " +
                     Name(share));
  }
  if (header.reduced_by() >= static_cast<uint32_t>(n_)) return Malformed("bad reduced_by");
  if (header.contributors_size() > n_) return Malformed("too many contributors");
  uint32_t previous = 0;
  for (int i = 0; i < header.contributors_size(); ++i) {
    uint32_t c = header.contributors(i);
    if (c >= static_cast<uint32_t>(n_) || !group_.members[c].contributes() ||
        (i > 0 && c <= previous)) {
      return Malformed("bad contributor list");
    }
    previous = c;
  }
  if (header.contributors_size() == 0) return Malformed("a result without contributors");
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Reductions

std::shared_ptr<Reduction> Round::NewReductionLocked(int share, size_t position,
                                                     Clock::time_point deadline) {
  auto reduction = std::make_shared<Reduction>();
  reduction->share = share;
  reduction->position = position;
  reduction->first_part = partition_.first_part(share);
  reduction->started = Clock::now();
  reduction->deadline = deadline;
  reduction->sources.resize(n_);
  size_t parts = partition_.num_parts(share);
  reduction->entries.assign(parts, std::vector<Entry>(n_));
  reduction->state.assign(parts, PartState::kWaiting);
  reductions_[{share, position}] = reduction;
  return reduction;
}

Entry Round::LocalEntryLocked(size_t part) const {
  Entry entry;
  if (view_[part].final) {
    entry.kind = EntryKind::kFinal;
    entry.values = view_[part].values;
    entry.contributors = view_[part].contributors;
    entry.reduced_by = view_[part].reduced_by;
  } else if (contributes_ && input_) {
    const Part& span = partition_.parts()[part];
    entry.kind = EntryKind::kContribution;
    entry.values = Payload(input_->data() + span.begin, span.size * sizeof(float), input_);
    entry.weight = weight_;
  } else {
    entry.kind = EntryKind::kAbsent;
  }
  return entry;
}

void Round::DeliverLocked(Reduction& reduction, int member, size_t k, Entry entry) {
  Source& source = reduction.sources[member];
  source.last_seen = Clock::now();
  ++source.delivered;
  // An excluded source's contributions no longer count, but a final value is a fact (its reducer
  // computed it once, every copy is identical), so adopting it can only keep members together.
  if (source.excluded && entry.kind != EntryKind::kFinal) return;
  if (reduction.state[k] != PartState::kWaiting) return;
  reduction.entries[k][member] = std::move(entry);
}

void Round::ExcludeLocked(Reduction& reduction, int member, const std::string& why, bool dead) {
  Source& source = reduction.sources[member];
  NoteFailureLocked(member, why, dead);
  if (source.excluded || !source.expected) return;
  source.excluded = true;
  // Dropped from every part not reduced yet; parts already reduced keep its contribution.
  for (size_t k = 0; k < reduction.state.size(); ++k) {
    Entry& entry = reduction.entries[k][member];
    if (reduction.state[k] == PartState::kWaiting && entry.kind != EntryKind::kFinal) {
      entry = Entry();
    }
  }
  cv_.notify_all();
}

Computed Round::Compute(const Reduction& reduction, size_t k,
                        const std::vector<Entry>& entries) const {
  Computed out;
  out.k = k;
  for (const Entry& entry : entries) {
    if (entry.kind == EntryKind::kFinal) {
      // Adopted as it is: re-encoding with a lossy codec could change it.
      out.values = entry.values;
      out.wire = {entry.values};
      out.raw = true;
      out.contributors = entry.contributors;
      out.reduced_by = entry.reduced_by;
      return out;
    }
  }
  const Part& part = partition_.parts()[reduction.first_part + k];
  std::vector<const float*> inputs;
  std::vector<double> weights;
  std::vector<std::vector<float>> scratch(n_);
  for (int m = 0; m < n_; ++m) {
    const Entry& entry = entries[m];
    if (entry.kind != EntryKind::kContribution) continue;
    inputs.push_back(FloatsOf(entry.values, scratch[m]));
    weights.push_back(entry.weight);
    out.contributors.push_back(m);
  }
  // My own share's results go in place (results_, for a contributor); a backup's to a fresh
  // buffer.
  if (reduction.position == 0 && reduction.share == me_ && share_results_) {
    size_t offset = part.begin - share_results_base_;
    out.values =
        Payload(share_results_->data() + offset, part.size * sizeof(float), share_results_);
  } else {
    out.values = Payload::Allocate(part.size * sizeof(float));
  }
  // In member order: the value does not depend on arrival order.
  float* result = reinterpret_cast<float*>(out.values.mutable_data());
  if (!WeightedMean(inputs.data(), weights.data(), inputs.size(), part.size, result)) {
    // Received parts are not checked on arrival (the mean's check stands for theirs): find who
    // sent the non-finite values. Pump excludes them and reduces the part again.
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (!AllFinite(inputs[i], part.size)) out.non_finite.push_back(out.contributors[i]);
    }
    if (!out.non_finite.empty()) return out;
  }
  out.reduced_by = me_;
  if (codec_.lossless()) {
    out.wire = {out.values};
    return out;
  }
  // Every member gets the decoded result; so does this one, or it would differ from them.
  auto encoded = codec_.Encode(out.values, part.begin);
  Status decoded =
      encoded.ok() ? codec_.DecodeInto(*encoded, part.begin, part.size, result) : encoded.status();
  if (!decoded.ok()) {
    // The codecs encode every finite float32; a failure here is a bug, not a peer's fault.
    HM_LOG(kError) << "part " << reduction.first_part + k
                   << " could not be encoded, sent raw: " << decoded.ToString();
    out.wire = {out.values};
    out.raw = true;
    return out;
  }
  out.wire = std::move(encoded).value();
  return out;
}

bool PartReady(const Reduction& reduction, size_t k) {
  if (reduction.state[k] != PartState::kWaiting) return false;
  const auto& entries = reduction.entries[k];
  for (const Entry& entry : entries) {
    if (entry.kind == EntryKind::kFinal) return true;
  }
  for (size_t m = 0; m < entries.size(); ++m) {
    const Source& source = reduction.sources[m];
    if (source.expected && !source.excluded && entries[m].kind == EntryKind::kNone) return false;
  }
  return true;
}

// Reduces every part that has all it waits for. The arithmetic runs without the lock; the commit
// re-checks under the lock that this peer still owns the share, so a part is published either
// before a backup collected this peer's state (and the backup adopts it) or never.
void Round::Pump(std::unique_lock<std::mutex>& lock, Reduction& reduction) {
  while (true) {
    std::vector<std::pair<size_t, std::vector<Entry>>> work;
    bool abandoned = false;
    for (size_t k = 0; k < reduction.state.size(); ++k) {
      if (!PartReady(reduction, k)) continue;
      if (owner_pos_[reduction.share] != reduction.position) {
        // A backup collected this share: its results count, and they may already sit where this
        // reduction would write (results_, for this member's own share).
        reduction.state[k] = PartState::kAbandoned;
        reduction.entries[k].assign(n_, Entry());
        ++reduction.terminal;
        abandoned = true;
        continue;
      }
      reduction.state[k] = PartState::kReducing;
      work.emplace_back(k, reduction.entries[k]);
    }
    if (abandoned) cv_.notify_all();
    if (work.empty()) return;
    // Captured with the parts set to kReducing, so Run waits for this batch before it returns.
    float* mirror = reduction.share == me_ && reduction.position == 0 ? mirror_ : nullptr;
    lock.unlock();
    std::vector<Computed> results;
    for (const auto& [k, entries] : work) {
      results.push_back(Compute(reduction, k, entries));
      Computed& result = results.back();
      const Part& part = partition_.parts()[reduction.first_part + k];
      // While the part is in the cache. Only values in place in results_ are the own share's.
      if (mirror && result.non_finite.empty() && results_ &&
          result.values.data() == reinterpret_cast<const uint8_t*>(results_->data() + part.begin)) {
        MirrorCopy(result.values.data(), MirroredElements(part) * sizeof(float),
                   mirror + part.begin);
        result.mirrored = true;
      }
    }
    lock.lock();
    // A member that sent non-finite values is excluded before anything of this batch is
    // published, and every part of the batch it contributed to is reduced again without it: so
    // no part from its first bad one on counts it, whatever order the batch was reduced in.
    std::map<int, size_t> non_finite;  // member -> first part found
    for (const Computed& result : results) {
      for (int m : result.non_finite) non_finite.emplace(m, reduction.first_part + result.k);
    }
    std::vector<size_t> published;
    for (Computed& result : results) {
      const bool again = std::any_of(result.contributors.begin(), result.contributors.end(),
                                     [&](int m) { return non_finite.count(m) != 0; });
      if (again) {
        reduction.state[result.k] = PartState::kWaiting;
        for (const auto& [m, first] : non_finite) reduction.entries[result.k][m] = Entry();
        continue;
      }
      ++reduction.terminal;
      size_t part = reduction.first_part + result.k;
      // Free the inputs: nothing reads them after the reduction.
      for (Entry& entry : reduction.entries[result.k]) entry = Entry();
      if (owner_pos_[reduction.share] != reduction.position || result.contributors.empty()) {
        reduction.state[result.k] = PartState::kAbandoned;
        continue;
      }
      reduction.state[result.k] = PartState::kDone;
      PartView& view = view_[part];
      if (!view.final) {
        view.final = true;
        view.values = result.values;
        view.contributors = result.contributors;
        view.reduced_by = result.reduced_by;
        mirrored_[part] = result.mirrored;
      }
      progress_[reduction.share] = Clock::now();
      wire::AveragingHeader header;
      header.set_kind(wire::RESULT);
      header.set_part(static_cast<uint32_t>(part));
      header.set_reduced_by(static_cast<uint32_t>(result.reduced_by));
      for (int c : result.contributors) header.add_contributors(static_cast<uint32_t>(c));
      header.set_raw(result.raw);
      Message message = Encode(header, result.wire);
      for (auto& [member, sink] : reduction.sinks) {
        if (!reduction.sources[member].excluded) sink->outbox.push_back(message);
      }
      published.push_back(part);
    }
    for (const auto& [m, part] : non_finite) {
      const Part& range = partition_.parts()[part];
      const std::string why = "part " + std::to_string(part) + " (elements [" +
                              std::to_string(range.begin) + ", " +
                              std::to_string(range.begin + range.size) + ")) has non-finite values";
      if (m == me_ && !fatal_) {
        // The own share's range is not checked before the round (see Run): found here.
        fatal_ = Status(StatusCode::kInvalidArgument,
                        "the local vector has non-finite values (" + why + ")");
      }
      ExcludeLocked(reduction, m, why, false);
    }
    cv_.notify_all();
    if (options_.observer && !published.empty()) {
      lock.unlock();
      for (size_t part : published) Notify(RoundEvent::kPartReduced, part);
      lock.lock();
    }
  }
}

void Round::AbandonLocked(int share) {
  for (auto& [key, reduction] : reductions_) {
    if (key.first != share || key.second == owner_pos_[share]) continue;
    for (size_t k = 0; k < reduction->state.size(); ++k) {
      if (reduction->state[k] != PartState::kWaiting) continue;
      reduction->state[k] = PartState::kAbandoned;
      reduction->entries[k].assign(n_, Entry());
      ++reduction->terminal;
    }
  }
  cv_.notify_all();
}

void Round::ArmRead(const std::shared_ptr<Channel>& channel) {
  channel->pending = channel->stream->Read();
  // Weak, both: the channel holds the future that holds this callback, so a read that never
  // completes (its stream was dropped) would otherwise keep the channel, and through it the
  // round, alive forever.
  std::weak_ptr<Round> weak = weak_from_this();
  std::weak_ptr<Channel> weak_channel = channel;
  // May run right here (a message was waiting), so the caller must not hold mutex_.
  channel->pending.OnReady([weak, weak_channel](const Result<std::optional<Message>>&) {
    auto self = weak.lock();
    auto channel = weak_channel.lock();
    if (!self || !channel) return;
    std::lock_guard<std::mutex> lock(self->mutex_);
    channel->read_ready = true;
    self->cv_.notify_all();
  });
}

// ---------------------------------------------------------------------------------------------
// Member side: results, reducer failures, takeovers

Status Round::ApplyResultLocked(int share, size_t position, const wire::AveragingHeader& header,
                                const std::vector<Payload>& payloads) {
  PartView& view = view_[header.part()];
  if (owner_pos_[share] != position || view.final) return Status::Ok();
  const Part& part = partition_.parts()[header.part()];
  Payload values;
  if (results_ && payloads.size() == 1 &&
      payloads[0].data() == reinterpret_cast<const uint8_t*>(results_->data() + part.begin)) {
    // Read in place by PlaceResult, and checked by the reader (it delivers only complete reads).
    if (placement_[header.part()] != Placement::kReceived) {
      return Malformed("elements [" + std::to_string(part.begin) + ", " +
                       std::to_string(part.begin + part.size) + ") have non-finite values");
    }
    values = payloads[0];
    mirrored_[header.part()] = mirror_ != nullptr;  // PlaceResult gave the read the mirror too
  } else {
    // Decoded into the round's pooled buffer, so the transport's buffer is freed now: received
    // buffers held through the grace period made the allocator map and unmap fresh memory every
    // round (a third of a 64 MiB round). Not where this member's own reduction of the part (a
    // backup took its share over meanwhile) or a placed read is still writing: GatherResults
    // copies it in later.
    values = results_ && !ResultsBeingWrittenLocked(header.part())
                 ? Payload(results_->data() + part.begin, part.size * sizeof(float), results_)
                 : Payload::Allocate(part.size * sizeof(float));
    float* target = reinterpret_cast<float*>(values.mutable_data());
    Status decoded = header.raw() ? PartCodec().DecodeInto(payloads, part.begin, part.size, target)
                                  : codec_.DecodeInto(payloads, part.begin, part.size, target);
    if (!decoded.ok()) return decoded;
  }
  view.final = true;
  view.values = std::move(values);
  view.contributors.assign(header.contributors().begin(), header.contributors().end());
  view.reduced_by = static_cast<int>(header.reduced_by());
  progress_[share] = Clock::now();
  cv_.notify_all();
  return Status::Ok();
}

std::shared_ptr<const net::ReceivePlacer> Round::ResultPlacer(int share) {
  auto placer = std::make_shared<net::ReceivePlacer>();
  // Weak: the stream holding the placer must not keep the round alive.
  std::weak_ptr<Round> weak = weak_from_this();
  // The part being read: whether it is finite so far, and where its bytes are mirrored. The three
  // run on the stream's reader thread, one part after the other, so this needs no lock.
  struct PlacedRead {
    bool finite = true;
    const uint8_t* start = nullptr;
    uint8_t* mirror = nullptr;
    size_t mirror_bytes = 0;
    size_t whole_mirror_bytes = 0;
  };
  auto read = std::make_shared<PlacedRead>();
  placer->place = [weak, share, read](const std::string& header, size_t index, size_t size) {
    *read = PlacedRead();
    auto self = weak.lock();
    if (!self) return Payload();
    Payload buffer =
        self->PlaceResult(share, header, index, size, &read->mirror, &read->mirror_bytes);
    read->start = buffer.data();
    read->whole_mirror_bytes = self->options_.mirror_elements * sizeof(float);
    return buffer;
  };
  // Checked (and mirrored) as the bytes arrive, while they are in the reader's cache: checking a
  // whole 1 MiB part after its read cost 5-8 % of a 64 MiB round (docs/benchmarks.md).
  placer->arrived = [read](const uint8_t* data, size_t size) {
    if (read->finite) read->finite = AllFinite(data, size / sizeof(float));
    const auto at = static_cast<size_t>(data - read->start);
    if (read->mirror && at < read->mirror_bytes) {
      CopyToMirror(data, std::min(size, read->mirror_bytes - at), read->mirror + at,
                   read->whole_mirror_bytes);
    }
  };
  placer->placed = [weak, read](const Payload& buffer, bool complete) {
    if (auto self = weak.lock()) self->ResultPlaced(buffer, complete, read->finite);
  };
  return placer;
}

Payload Round::PlaceResult(int share, const std::string& header_bytes, size_t index, size_t size,
                           uint8_t** mirror, size_t* mirror_bytes) {
  wire::AveragingHeader header;
  if (index != 0 || !header.ParseFromString(header_bytes) || header.kind() != wire::RESULT ||
      !CheckResult(header, share).ok()) {
    return Payload();  // the usual path judges it
  }
  const size_t p = header.part();
  const Part& part = partition_.parts()[p];
  if (size != part.size * sizeof(float) || !(header.raw() || codec_.Raw(part.begin, part.size))) {
    return Payload();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (!results_ || fatal_ || view_[p].final || owner_pos_[share] != 0 ||
      placement_[p] != Placement::kNone || ResultsBeingWrittenLocked(p)) {
    return Payload();
  }
  placement_[p] = Placement::kReceiving;
  ++receiving_;
  // Run waits for receiving_ to reach 0 before it returns, so this read ends before then.
  if (mirror_ && MirroredElements(part) > 0) {
    *mirror = reinterpret_cast<uint8_t*>(mirror_ + part.begin);
    *mirror_bytes = MirroredElements(part) * sizeof(float);
  }
  return Payload(results_->data() + part.begin, size, results_);
}

void Round::ResultPlaced(const Payload& buffer, bool complete, bool finite) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto begin = static_cast<size_t>(reinterpret_cast<const float*>(buffer.data()) -
                                         results_->data());  // where PlaceResult put the part
  const auto& parts = partition_.parts();
  auto it = std::lower_bound(parts.begin(), parts.end(), begin,
                             [](const Part& part, size_t at) { return part.begin < at; });
  const size_t p = it - parts.begin();
  placement_[p] =
      !complete ? Placement::kBroken : (finite ? Placement::kReceived : Placement::kNonFinite);
  --receiving_;
  cv_.notify_all();
}

void Round::OwnerFailedLocked(int share, size_t position, const std::string& why, bool dead) {
  if (!contributes_ || fatal_ || owner_pos_[share] != position || ShareFinalLocked(share)) return;
  std::vector<int> chain = Chain(share);
  NoteFailureLocked(chain[position], why, dead);
  size_t next = position + 1;
  while (next < chain.size() && dead_.count(chain[next]) > 0) ++next;
  if (next >= chain.size()) {
    fatal_ =
        Status(StatusCode::kUnavailable, "no live reducer left for the share of " + Name(share) +
                                             " (last: " + Name(chain[position]) + ": " + why + ")");
    cv_.notify_all();
    return;
  }
  HM_LOG(kInfo) << "all-reduce: " << Name(chain[position]) << " failed (" << why << "); "
                << Name(chain[next]) << " takes over the share of " << Name(share);
  owner_pos_[share] = next;
  progress_[share] = Clock::now();
  AbandonLocked(share);
  if (chain[next] == me_) {
    StartTakeoverLocked(share, next);
  } else {
    auto self = shared_from_this();
    if (auto service = service_.lock()) {
      service->Spawn([self, share, next] { self->RequestTakeover(share, next); });
    }
  }
  cv_.notify_all();
}

void Round::StartTakeoverLocked(int share, size_t position) {
  if (reductions_.count({share, position}) > 0 || owner_pos_[share] > position) return;
  owner_pos_[share] = position;
  progress_[share] = Clock::now();
  AbandonLocked(share);
  ++takeovers_;
  // A takeover may start after this peer returned (grace period): give it a full timeout.
  auto reduction = NewReductionLocked(share, position, Clock::now() + options_.timeout);
  for (int m = 0; m < n_; ++m) {
    // Everyone, replaced owners and peers believed dead included: a slow owner may have published
    // parts already, and a transport error is not always proof of death. A dead peer's address
    // refuses the collect at once, so asking costs little.
    reduction->sources[m].expected = true;
    reduction->sources[m].last_seen = reduction->started;
  }
  reduction->sources[me_].connected = true;
  for (size_t k = 0; k < reduction->state.size(); ++k) {
    DeliverLocked(*reduction, me_, k, LocalEntryLocked(reduction->first_part + k));
  }
  auto self = shared_from_this();
  if (auto service = service_.lock()) {
    service->Spawn([self, reduction] { self->RunTakeover(reduction); });
  }
}

void Round::RequestTakeover(int share, size_t position) {
  int target = Chain(share)[position];
  Millis left = std::max(Millis(1), std::chrono::duration_cast<Millis>(deadline_ - Clock::now()));
  auto stream =
      node_.OpenStream(group_.members[target].address, methods_[kTakeover], net::CallOptions{left});
  wire::AveragingHeader header;
  header.set_kind(wire::TAKEOVER);
  header.set_group_id(group_.id);
  header.set_group_digest(digest_);
  header.set_sender(static_cast<uint32_t>(me_));
  header.set_share(static_cast<uint32_t>(share));
  header.set_position(static_cast<uint32_t>(position));
  stream->Write(Encode(header));
  stream->CloseWrite();
  ReadFuture pending = stream->Read();
  std::weak_ptr<Round> weak = weak_from_this();
  auto answered = std::make_shared<bool>(false);
  pending.OnReady([weak, answered](const Result<std::optional<Message>>&) {
    auto self = weak.lock();
    if (!self) return;
    std::lock_guard<std::mutex> lock(self->mutex_);
    *answered = true;
    self->cv_.notify_all();
  });
  std::unique_lock<std::mutex> lock(mutex_);
  // The stream fails at its own deadline; the extra second only covers the failure's delivery.
  cv_.wait_until(lock, Clock::now() + left + Millis(1000), [&] { return *answered || stopping_; });
  if (!*answered) {
    lock.unlock();
    stream->Cancel();
    return;
  }
  Result<std::optional<Message>> reply = pending.Wait();
  if (!reply.ok()) {
    if (!IsRefusal(reply.status())) {
      OwnerFailedLocked(share, position, "takeover request failed: " + reply.status().ToString(),
                        ConfirmsDeath(reply.status()));
    }
    return;
  }
  wire::AveragingHeader answer;
  if (!reply->has_value() || !answer.ParseFromString((*reply)->header) ||
      answer.kind() != wire::TAKEOVER_ACCEPTED) {
    OwnerFailedLocked(share, position, "did not accept the takeover");
  }
}

// A backup's job: collect what every live member holds for the share, adopt a final value where
// anyone has one, reduce contributions otherwise, and send every part to every member.
void Round::RunTakeover(std::shared_ptr<Reduction> reduction) {
  const int share = reduction->share;
  std::vector<std::pair<int, std::shared_ptr<Channel>>> channels;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    for (int m = 0; m < n_; ++m) {
      if (m == me_ || !reduction->sources[m].expected) continue;
      auto channel = std::make_shared<Channel>();
      channel->member = m;
      channels.emplace_back(m, channel);
      channels_.push_back(channel);
      reduction->sinks[m] = channel;
      reduction->sources[m].connected = true;
    }
    Pump(lock, *reduction);
  }
  wire::AveragingHeader collect;
  collect.set_kind(wire::COLLECT);
  collect.set_group_id(group_.id);
  collect.set_group_digest(digest_);
  collect.set_sender(static_cast<uint32_t>(me_));
  collect.set_share(static_cast<uint32_t>(share));
  collect.set_position(static_cast<uint32_t>(reduction->position));
  auto open_collect = [&](int m, const std::shared_ptr<Channel>& channel) {
    Millis left =
        std::max(Millis(1), std::chrono::duration_cast<Millis>(reduction->deadline - Clock::now()));
    ++channel->attempts;
    channel->owned =
        node_.OpenStream(group_.members[m].address, methods_[kCollect], net::CallOptions{left});
    channel->stream = channel->owned.get();
    channel->stream->Write(Encode(collect));
    ArmRead(channel);
  };
  for (auto& [m, channel] : channels) open_collect(m, channel);
  const size_t parts = reduction->state.size();
  Millis tick = std::max(Millis(10), options_.sender_timeout / 4);
  // Set when a member refuses this collect because it already follows a later backup. Reducing
  // without that member would hand it and the others different values for the same parts, so
  // this backup steps aside: the later backup collects from this peer too, and adopts whatever
  // this takeover already published.
  bool follows_later_backup = false;
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    auto pending_output = [&] {
      for (auto& [m, channel] : channels) {
        if (!channel->outbox.empty()) return true;
      }
      return false;
    };
    auto ready = [&] {
      for (auto& [m, channel] : channels) {
        if (channel->read_ready) return true;
      }
      return pending_output() || stopping_ || reduction->finished() || follows_later_backup ||
             owner_pos_[share] != reduction->position;
    };
    cv_.wait_until(lock, std::min(reduction->deadline, Clock::now() + tick), ready);
    // Writes and reads happen without the lock.
    std::vector<std::pair<std::shared_ptr<Channel>, std::deque<Message>>> outgoing;
    std::vector<std::shared_ptr<Channel>> readable;
    for (auto& [m, channel] : channels) {
      if (!channel->outbox.empty()) outgoing.emplace_back(channel, std::move(channel->outbox));
      channel->outbox.clear();
      if (channel->read_ready) {
        channel->read_ready = false;
        readable.push_back(channel);
      }
    }
    bool superseded = owner_pos_[share] != reduction->position || follows_later_backup;
    bool finished = reduction->finished() && outgoing.empty();
    bool expired = Clock::now() >= reduction->deadline || stopping_;
    lock.unlock();
    for (auto& [channel, messages] : outgoing) {
      for (auto& message : messages) channel->stream->Write(std::move(message));
    }
    if (finished || superseded || expired) {
      HM_LOG(kInfo) << "all-reduce: takeover of the share of " << Name(share) << " at position "
                    << reduction->position
                    << (finished     ? " finished"
                        : superseded ? " superseded"
                                     : " expired");
      for (auto& [m, channel] : channels) {
        if (finished) {
          channel->stream->CloseWrite();
        } else {
          channel->stream->Cancel();
        }
      }
      lock.lock();
      if (!finished && !superseded) {
        for (size_t k = 0; k < parts; ++k) {
          if (reduction->state[k] == PartState::kWaiting) {
            reduction->state[k] = PartState::kAbandoned;
            ++reduction->terminal;
          }
        }
      }
      cv_.notify_all();
      return;
    }
    for (auto& channel : readable) {
      Result<std::optional<Message>> read = channel->pending.Wait();
      int m = channel->member;
      Status status = Status::Ok();
      bool dead = false;
      bool rearm = false;
      if (!read.ok() && FollowsLaterBackup(read.status())) {
        follows_later_backup = true;
        break;
      }
      if (!read.ok() && ShouldRetry(read.status(), *channel)) {
        open_collect(m, channel);
        continue;
      }
      if (read.ok()) ++channel->received;
      if (!read.ok()) {
        status = read.status();
        dead = ConfirmsDeath(status);
      } else if (!read->has_value()) {
        channel->read_closed = true;
      } else {
        status = HandleForward(*reduction, m, **read);
        rearm = status.ok();
      }
      lock.lock();
      Source& source = reduction->sources[m];
      if (!status.ok()) {
        ExcludeLocked(*reduction, m, "takeover collect: " + status.ToString(), dead);
        channel->read_closed = true;
      } else if (channel->read_closed && source.delivered < parts) {
        ExcludeLocked(*reduction, m, "closed its takeover stream early", false);
      }
      Pump(lock, *reduction);
      lock.unlock();
      if (!status.ok() && !dead) channel->stream->Cancel();
      if (rearm) ArmRead(channel);
    }
    lock.lock();
    auto now = Clock::now();
    for (auto& [m, channel] : channels) {
      Source& source = reduction->sources[m];
      if (!source.excluded && source.delivered < parts &&
          now - source.last_seen >= options_.sender_timeout) {
        ExcludeLocked(*reduction, m,
                      "sent nothing to the takeover for " + Ms(options_.sender_timeout), false);
        Pump(lock, *reduction);
      }
    }
  }
}

Status Round::HandleForward(Reduction& reduction, int member, const Message& message) {
  wire::AveragingHeader header;
  if (!header.ParseFromString(message.header) || header.kind() != wire::FORWARD) {
    return Malformed("expected a FORWARD message");
  }
  size_t first = reduction.first_part;
  if (header.part() < first || header.part() >= first + reduction.state.size()) {
    return Malformed("forwarded part " + std::to_string(header.part()) + " is not in the share");
  }
  size_t k = header.part() - first;
  const Part& part = partition_.parts()[header.part()];
  Entry entry;
  switch (header.state()) {
    case wire::PART_FINAL: {
      // Forwarded as the member holds it: decoded float32.
      Status ok = CheckResult(header, reduction.share);
      if (!ok.ok()) return ok;
      auto values = PartCodec().Decode(message.payloads, part.begin, part.size);
      if (!values.ok()) return values.status();
      entry.kind = EntryKind::kFinal;
      entry.values = std::move(values).value();
      entry.contributors.assign(header.contributors().begin(), header.contributors().end());
      entry.reduced_by = static_cast<int>(header.reduced_by());
      break;
    }
    case wire::PART_CONTRIBUTION: {
      double w = header.weight();
      if (!group_.members[member].contributes())
        return Malformed("a contribution from a non-contributor");
      if (!std::isfinite(w) || w <= 0 || w > options_.max_weight) {
        return Malformed("weight " + std::to_string(w) + " is not in (0, max_weight]");
      }
      if (message.payloads.size() != 1 || message.payloads[0].size() != part.size * sizeof(float)) {
        return Malformed("forwarded part has the wrong size");
      }
      if (!PayloadFinite(message.payloads[0])) return Malformed("forwarded part is not finite");
      entry.kind = EntryKind::kContribution;
      entry.values = message.payloads[0];
      entry.weight = w;
      break;
    }
    case wire::PART_ABSENT:
      if (!message.payloads.empty()) return Malformed("an absent part with a payload");
      entry.kind = EntryKind::kAbsent;
      break;
    default:
      return Malformed("unknown part state");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (reduction.entries[k][member].kind != EntryKind::kNone &&
      reduction.state[k] == PartState::kWaiting) {
    return Malformed("part " + std::to_string(header.part()) + " forwarded twice");
  }
  DeliverLocked(reduction, member, k, std::move(entry));
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Served streams

Status Round::ServeSender(const net::CallContext& context, Stream& stream,
                          const wire::AveragingHeader& open) {
  Status ok = CheckHeader(open, stream);
  if (!ok.ok()) return ok;
  const int m = static_cast<int>(open.sender());
  if (!group_.members[m].contributes())
    return Refused(Name(m) + " is auxiliary: it contributes nothing");
  if (open.total_elements() != partition_.total_elements() ||
      open.part_elements() != partition_.part_elements()) {
    return Malformed("vector of " + std::to_string(open.total_elements()) +
                     " elements in parts of " + std::to_string(open.part_elements()) +
                     ", this round has " + std::to_string(partition_.total_elements()) +
                     " in parts of " + std::to_string(partition_.part_elements()));
  }
  double w = open.weight();
  if (!std::isfinite(w) || w <= 0 || w > options_.max_weight) {
    return Malformed("weight " + std::to_string(w) + " is not in (0, " +
                     std::to_string(options_.max_weight) + "]");
  }
  if (open.codec_digest() != codec_.digest()) {
    return Malformed(Name(m) + " compresses other ranges of the vector, or with other codecs");
  }
  auto channel = std::make_shared<Channel>();
  channel->stream = &stream;
  channel->member = m;
  std::shared_ptr<Reduction> reduction;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = reductions_.find({me_, 0});
    if (it == reductions_.end()) return Refused("this peer reduces no share of the group");
    reduction = it->second;
    Source& source = reduction->sources[m];
    if (source.excluded) return Refused(Name(m) + " was excluded from the round");
    if (source.connected)
      return Status(StatusCode::kPermissionDenied, "a second stream from " + Name(m));
    source.connected = true;
    source.weight = w;
    source.last_seen = Clock::now();
    reduction->sinks[m] = channel;
  }
  const size_t parts = reduction->state.size();
  const size_t first = reduction->first_part;
  ArmRead(channel);
  std::unique_lock<std::mutex> lock(mutex_);
  Source& source = reduction->sources[m];
  auto finish = [&](Status status) {
    // After this the stream reference dies: nobody may queue into this channel any more.
    channel->stream = nullptr;
    reduction->sinks.erase(m);
    return status;
  };
  while (true) {
    cv_.wait_until(lock, std::min(deadline_, context.deadline), [&] {
      return channel->read_ready || !channel->outbox.empty() || source.excluded || stopping_ ||
             (source.done_reading && reduction->finished());
    });
    std::deque<Message> outgoing;
    outgoing.swap(channel->outbox);
    bool readable = channel->read_ready;
    channel->read_ready = false;
    bool finished = source.done_reading && reduction->finished();
    if (source.excluded) {
      return finish(Refused(
          Name(m) + " was excluded: " + (failures_.empty() ? std::string() : failures_.back())));
    }
    if (stopping_) return finish(Status(StatusCode::kCancelled, "the averaging service stopped"));
    if (Clock::now() >= std::min(deadline_, context.deadline) && !readable && outgoing.empty()) {
      ExcludeLocked(*reduction, m, "round timed out", false);
      Pump(lock, *reduction);
      return finish(Status(StatusCode::kDeadlineExceeded, "the round timed out"));
    }
    lock.unlock();
    for (auto& message : outgoing) stream.Write(std::move(message));
    if (finished && outgoing.empty()) {
      lock.lock();
      return finish(Status::Ok());
    }
    Status status = Status::Ok();
    bool dead = false;
    bool rearm = false;
    if (readable) {
      Result<std::optional<Message>> read = channel->pending.Wait();
      if (!read.ok() && read.status().code() == StatusCode::kUnavailable) {
        lock.lock();
        if (source.delivered == 0) {
          // Possibly a connection lost before anything arrived: the sender may open its stream
          // again (see ShouldRetry); the connect timer still bounds the wait for it.
          source.connected = false;
          return finish(read.status());
        }
        lock.unlock();
      }
      if (!read.ok()) {
        status = read.status();
        dead = ConfirmsDeath(status);
      } else if (!read->has_value()) {
        lock.lock();
        source.done_reading = true;
        if (source.delivered < parts) {
          ExcludeLocked(*reduction, m,
                        "closed its stream after " + std::to_string(source.delivered) + " of " +
                            std::to_string(parts) + " parts",
                        false);
        }
        Pump(lock, *reduction);
        continue;
      } else {
        const Message& message = **read;
        wire::AveragingHeader header;
        Payload values;
        if (!header.ParseFromString(message.header) || header.kind() != wire::PART) {
          status = Malformed("expected a PART message");
        } else if (header.part() < first || header.part() >= first + parts) {
          status = Malformed("part " + std::to_string(header.part()) +
                             " is not in this reducer's share");
        } else {
          const Part& part = partition_.parts()[header.part()];
          // Unchecked: Compute checks the weighted mean instead, and excludes this sender if
          // its part was not finite.
          auto decoded = codec_.Decode(message.payloads, part.begin, part.size, false);
          if (decoded.ok()) {
            values = std::move(decoded).value();
          } else {
            status = Malformed("part " + std::to_string(header.part()) + ": " +
                               decoded.status().message());
          }
        }
        if (status.ok()) {
          size_t k = header.part() - first;
          lock.lock();
          if (reduction->state[k] == PartState::kAbandoned) {
            // A backup owns the share now: the part only counts as delivered.
            DeliverLocked(*reduction, m, k, Entry());
            rearm = true;
          } else if (reduction->entries[k][m].kind != EntryKind::kNone ||
                     reduction->state[k] != PartState::kWaiting) {
            // A duplicate, or a part already reduced without this sender: both are violations
            // (a sender sends each part once, and parts are only reduced without a live sender
            // after it was excluded).
            status = Malformed("part " + std::to_string(header.part()) + " sent twice or late");
          } else {
            Entry entry;
            entry.kind = EntryKind::kContribution;
            entry.values = std::move(values);
            entry.weight = source.weight;
            DeliverLocked(*reduction, m, k, std::move(entry));
            Pump(lock, *reduction);
            rearm = true;
          }
          lock.unlock();
        }
      }
    }
    lock.lock();
    if (!status.ok()) {
      ExcludeLocked(*reduction, m, status.ToString(), dead);
      Pump(lock, *reduction);
      return finish(dead ? status
                         : Status(status.code(), Name(m) + " excluded: " + status.message()));
    }
    if (rearm) {
      lock.unlock();
      ArmRead(channel);
      lock.lock();
    }
  }
}

Status Round::ServeCollect(const net::CallContext& context, Stream& stream,
                           const wire::AveragingHeader& collect) {
  Status ok = CheckHeader(collect, stream);
  if (!ok.ok()) return ok;
  const int share = static_cast<int>(collect.share());
  if (collect.share() >= static_cast<uint32_t>(n_) || partition_.num_parts(share) == 0) {
    return Malformed("share " + std::to_string(collect.share()) + " has no parts");
  }
  std::vector<int> chain = Chain(share);
  const size_t position = collect.position();
  if (position == 0 || position >= chain.size() ||
      chain[position] != static_cast<int>(collect.sender())) {
    return Malformed(Name(collect.sender()) + " is not the backup at position " +
                     std::to_string(position) + " for the share of " + Name(share));
  }
  std::vector<Message> forwards;
  auto channel = std::make_shared<Channel>();
  channel->stream = &stream;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (owner_pos_[share] > position) {
      return Refused("the share of " + Name(share) + " " + kFollowsLaterBackup);
    }
    // Freeze: from now on only this backup's results count for the share. What this peer already
    // holds is forwarded, so the backup adopts it instead of computing something different.
    for (size_t q = owner_pos_[share]; q < position; ++q) {
      NoteFailureLocked(chain[q], "replaced by backup " + Name(chain[position]), false);
    }
    owner_pos_[share] = position;
    progress_[share] = Clock::now();
    size_t first = partition_.first_part(share);
    for (size_t p = first; p < first + partition_.num_parts(share); ++p) {
      Entry entry = LocalEntryLocked(p);
      wire::AveragingHeader header;
      header.set_kind(wire::FORWARD);
      header.set_part(static_cast<uint32_t>(p));
      std::vector<Payload> payloads;
      if (entry.kind == EntryKind::kFinal) {
        header.set_state(wire::PART_FINAL);
        header.set_reduced_by(static_cast<uint32_t>(entry.reduced_by));
        for (int c : entry.contributors) header.add_contributors(static_cast<uint32_t>(c));
        payloads.push_back(entry.values);
      } else if (entry.kind == EntryKind::kContribution) {
        header.set_state(wire::PART_CONTRIBUTION);
        header.set_weight(entry.weight);
        payloads.push_back(entry.values);
      } else {
        header.set_state(wire::PART_ABSENT);
      }
      forwards.push_back(Encode(header, std::move(payloads)));
    }
    AbandonLocked(share);
    cv_.notify_all();
  }
  for (auto& message : forwards) stream.Write(std::move(message));
  // An auxiliary member needs no result; returning closes the stream after the forwards leave.
  if (!contributes_) return Status::Ok();
  ArmRead(channel);
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    bool woke =
        cv_.wait_until(lock, context.deadline, [&] { return channel->read_ready || stopping_; });
    if (!woke || stopping_) {
      OwnerFailedLocked(share, position, "no results from the backup in time");
      return Status(StatusCode::kDeadlineExceeded, "no results from the backup in time");
    }
    channel->read_ready = false;
    lock.unlock();
    Result<std::optional<Message>> read = channel->pending.Wait();
    Status status = Status::Ok();
    wire::AveragingHeader header;
    if (!read.ok()) {
      status = read.status();
    } else if (!read->has_value()) {
      lock.lock();
      if (!ShareFinalLocked(share)) {
        OwnerFailedLocked(share, position, "backup closed its stream before every result");
      }
      return Status::Ok();
    } else if (!header.ParseFromString((*read)->header) || header.kind() != wire::RESULT) {
      status = Malformed("expected a RESULT message");
    } else {
      status = CheckResult(header, share);
    }
    if (status.ok()) {
      lock.lock();
      status = ApplyResultLocked(share, position, header, (*read)->payloads);
      lock.unlock();
    }
    if (status.ok()) {
      ++channel->received;
      Notify(RoundEvent::kResultReceived, header.part());
      ArmRead(channel);
      lock.lock();
      continue;
    }
    lock.lock();
    if (status.code() == StatusCode::kUnavailable && channel->received == 0) {
      // The backup may collect again over a new stream (see ShouldRetry); if it is really gone,
      // the reducer timeout moves this peer on.
      return status;
    }
    OwnerFailedLocked(share, position, "backup stream: " + status.ToString(),
                      ConfirmsDeath(status));
    return status;
  }
}

Status Round::ServeTakeover(Stream& stream, const wire::AveragingHeader& request) {
  Status ok = CheckHeader(request, stream);
  if (!ok.ok()) return ok;
  const int share = static_cast<int>(request.share());
  if (request.share() >= static_cast<uint32_t>(n_) || partition_.num_parts(share) == 0) {
    return Malformed("share " + std::to_string(request.share()) + " has no parts");
  }
  std::vector<int> chain = Chain(share);
  const size_t position = request.position();
  if (position == 0 || position >= chain.size() || chain[position] != me_) {
    return Malformed("this peer is not the backup at position " + std::to_string(position) +
                     " for the share of " + Name(share));
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (owner_pos_[share] > position)
      return Refused(std::string("the share ") + kFollowsLaterBackup);
    for (size_t q = owner_pos_[share]; q < position; ++q) {
      NoteFailureLocked(chain[q], "reported failed by " + Name(request.sender()), false);
    }
    StartTakeoverLocked(share, position);
  }
  wire::AveragingHeader reply;
  reply.set_kind(wire::TAKEOVER_ACCEPTED);
  stream.Write(Encode(reply)).Wait();
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// The caller's side of a round

void Round::CheckTimersLocked(Clock::time_point now) {
  auto own = reductions_.find({me_, 0});
  if (own != reductions_.end() && !own->second->finished()) {
    Reduction& reduction = *own->second;
    bool excluded = false;
    for (int m = 0; m < n_; ++m) {
      Source& source = reduction.sources[m];
      if (m == me_ || !source.expected || source.excluded) continue;
      if (!source.connected && options_.liveness_probe.count() > 0 && !source.probing &&
          now - start_ >= options_.liveness_probe &&
          now - source.probed >= options_.liveness_probe) {
        ProbeSenderLocked(source, m, now);
      }
      if (!source.connected && now - start_ >= options_.sender_timeout) {
        ExcludeLocked(reduction, m, "did not open its stream within " + Ms(options_.sender_timeout),
                      false);
        excluded = true;
      } else if (source.connected && source.delivered < reduction.state.size() &&
                 now - source.last_seen >= options_.sender_timeout) {
        ExcludeLocked(reduction, m, "sent nothing for " + Ms(options_.sender_timeout), false);
        excluded = true;
      }
    }
    if (excluded) {
      std::unique_lock<std::mutex> lock(mutex_, std::adopt_lock);
      Pump(lock, reduction);
      lock.release();
    }
  }
  if (!contributes_) return;
  for (int share = 0; share < n_; ++share) {
    if (partition_.num_parts(share) == 0 || ShareFinalLocked(share)) continue;
    std::vector<int> chain = Chain(share);
    if (chain[owner_pos_[share]] == me_) continue;  // my own reduction: bounded by sender timeouts
    if (now - progress_[share] >= options_.reducer_timeout) {
      OwnerFailedLocked(share, owner_pos_[share], "no result for " + Ms(options_.reducer_timeout));
    }
  }
}

void Round::ProbeSenderLocked(Source& source, int member, Clock::time_point now) {
  source.probing = true;
  source.probed = now;
  probes_due_.push_back(member);
}

// Without the lock: a call that fails at once runs its callback on this thread.
void Round::SendProbe(int member) {
  std::weak_ptr<Round> weak = weak_from_this();
  node_
      .Call(group_.members[member].address, methods_[kPing], net::Message(),
            net::CallOptions{options_.liveness_probe})
      .OnReady([weak, member](const Result<net::Message>& answer) {
        auto self = weak.lock();
        if (!self) return;
        std::unique_lock<std::mutex> lock(self->mutex_);
        auto own = self->reductions_.find({self->me_, 0});
        if (own == self->reductions_.end() || own->second->finished()) return;
        Reduction& reduction = *own->second;
        Source& source = reduction.sources[member];
        source.probing = false;
        // Only a peer that cannot be reached at all, twice in a row, is excluded early: a slow
        // answer is no proof, and one failed call may be a connection being replaced. Excluded,
        // not declared dead: that stays the business of the streams.
        if (answer.ok() || answer.status().code() != StatusCode::kUnavailable) {
          source.failed_probes = 0;
          return;
        }
        if (++source.failed_probes < 2 || source.connected || source.excluded) return;
        self->ExcludeLocked(reduction, member,
                            "is unreachable (" + answer.status().ToString() + ")", false);
        self->Pump(lock, reduction);
      });
}

void Round::OpenSenderStream(int share, const std::shared_ptr<Channel>& channel) {
  wire::AveragingHeader open;
  open.set_kind(wire::OPEN);
  open.set_group_id(group_.id);
  open.set_group_digest(digest_);
  open.set_sender(static_cast<uint32_t>(me_));
  open.set_weight(weight_);
  open.set_total_elements(partition_.total_elements());
  open.set_part_elements(partition_.part_elements());
  open.set_codec_digest(codec_.digest());
  Millis left = std::max(Millis(1), std::chrono::duration_cast<Millis>(deadline_ - Clock::now()));
  ++channel->attempts;
  net::CallOptions call{left};
  const size_t direct_bytes = options_.direct_stream_bytes.value_or(
      node_.encrypted() ? kDirectStreamBytesEncrypted : kDirectStreamBytesPlain);
  call.direct = direct_bytes > 0 && ShareElements(share) * sizeof(float) >= direct_bytes;
  channel->owned = node_.OpenStream(group_.members[share].address, methods_[kAllReduce], call);
  channel->stream = channel->owned.get();
  if (results_) channel->stream->SetReceivePlacer(ResultPlacer(share));
  channel->stream->Write(Encode(open));
  if (channel->withhold) {
    channel->stream->CloseWrite();
    return;
  }
  // Zero-copy: the payloads point into input_, which nobody modifies and which the payloads keep
  // alive until the transport has written them.
  size_t first = partition_.first_part(share);
  for (size_t p = first; p < first + partition_.num_parts(share); ++p) {
    const Part& part = partition_.parts()[p];
    wire::AveragingHeader header;
    header.set_kind(wire::PART);
    header.set_part(static_cast<uint32_t>(p));
    Payload values(input_->data() + part.begin, part.size * sizeof(float), input_);
    auto encoded = codec_.Encode(values, part.begin);
    if (!encoded.ok()) {
      // The codecs encode every finite float32 (the share was checked); should this ever fail,
      // the part goes raw and the reducer refuses it, which fails this round with a clear error.
      HM_LOG(kError) << "part " << p << " could not be encoded: " << encoded.status().ToString();
      encoded = std::vector<Payload>{values};
    }
    channel->stream->Write(Encode(header, std::move(encoded).value()));
    if (channel->attempts == 1) Notify(RoundEvent::kPartSent, p);
  }
  channel->stream->CloseWrite();
  ArmRead(channel);
}

Result<SharedMean> Round::Run(std::vector<float>& data) {
  auto service = service_.lock();
  if (!service) return Status(StatusCode::kCancelled, "the averaging service stopped");
  {
    service->Sweep();  // the buffers of released rounds go back to the pool first
    if (contributes_) {
      input_ = service->pool->Adopt(std::move(data));
      results_ = service->pool->Take(partition_.total_elements());
      share_results_ = results_;  // the own share is reduced in place: no copy at the end
    } else if (partition_.num_parts(me_) > 0) {
      size_t first = partition_.first_part(me_);
      size_t share_elements = 0;
      for (size_t p = first; p < first + partition_.num_parts(me_); ++p) {
        share_elements += partition_.parts()[p].size;
      }
      share_results_ = service->pool->Take(share_elements);
      share_results_base_ = partition_.parts()[first].begin;
    }
  }
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (partition_.num_parts(me_) > 0) {
      auto reduction = NewReductionLocked(me_, 0, deadline_);
      for (int m = 0; m < n_; ++m) {
        reduction->sources[m].expected = group_.members[m].contributes();
        reduction->sources[m].last_seen = start_;
      }
      reduction->sources[me_].connected = true;
    }
  }
  Status registered = service->Register(shared_from_this());
  if (!registered.ok()) {
    if (input_) data = std::move(*input_);  // never shared: nothing was sent
    return registered;
  }
  service.reset();
  Notify(RoundEvent::kStarted, 0);

  // Each share's range is checked just before it is sent (while the transport sends the previous
  // ones), not the whole vector before anything goes out. A range that is not finite fails this
  // member's round, and the group goes on without it at once (see Channel::withhold).
  std::optional<Status> not_finite;
  auto check = [&](int share) {
    if (!not_finite && !ShareInputFinite(share)) {
      not_finite =
          Status(StatusCode::kInvalidArgument,
                 "the local vector has non-finite values (in elements " + ShareSpan(share) + ")");
    }
  };
  if (contributes_) {
    for (int share = 0; share < n_; ++share) {
      if (share == me_ || partition_.num_parts(share) == 0) continue;
      check(share);
      auto channel = std::make_shared<Channel>();
      channel->member = share;
      channel->withhold = not_finite.has_value();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        sender_channels_[share] = channel;
        channels_.push_back(channel);
      }
      OpenSenderStream(share, channel);
    }
    // The own share's range is not checked: its reduction reads each of those values anyway,
    // and the weighted mean's check finds a non-finite one (Compute fails this member's round
    // then, and reduces the share without it). What no reduction by this member vouched for is
    // checked when the round ends (OwnShareInputFiniteLocked).
  }

  std::unique_lock<std::mutex> lock(mutex_);
  if (auto own = reductions_.find({me_, 0}); own != reductions_.end()) {
    Reduction& reduction = *own->second;
    if (not_finite) {
      // This member's own share is still reduced, from the others' parts.
      ExcludeLocked(reduction, me_, not_finite->message(), false);
    } else if (contributes_) {
      for (size_t k = 0; k < reduction.state.size(); ++k) {
        DeliverLocked(reduction, me_, k, LocalEntryLocked(reduction.first_part + k));
      }
    }
    Pump(lock, reduction);
  }
  if (not_finite && !fatal_) fatal_ = *not_finite;
  Millis tick =
      std::max(Millis(10), std::min(options_.sender_timeout, options_.reducer_timeout) / 4);
  if (options_.liveness_probe.count() > 0)
    tick = std::min(tick, std::max(Millis(10), options_.liveness_probe / 2));
  while (true) {
    if (fatal_ || DoneLocked() || stopping_) break;
    auto now = Clock::now();
    if (now >= deadline_) {
      std::string missing;
      for (int share = 0; share < n_; ++share) {
        if (partition_.num_parts(share) == 0 || (contributes_ && ShareFinalLocked(share))) continue;
        if (!contributes_ && share != me_) continue;
        int owner = Chain(share)[owner_pos_[share]];
        missing += (missing.empty() ? "" : ", ") + Name(owner);
      }
      fatal_ = Status(StatusCode::kDeadlineExceeded, "all-reduce timed out after " +
                                                         Ms(options_.timeout) +
                                                         "; waiting for results from " + missing);
      break;
    }
    std::vector<std::pair<int, std::shared_ptr<Channel>>> readable;
    for (auto& [share, channel] : sender_channels_) {
      if (channel->read_ready) {
        channel->read_ready = false;
        readable.emplace_back(share, channel);
      }
    }
    if (readable.empty()) {
      CheckTimersLocked(now);
      if (fatal_ || DoneLocked()) break;
      if (!probes_due_.empty()) {
        std::vector<int> probes;
        probes.swap(probes_due_);
        lock.unlock();
        for (int member : probes) SendProbe(member);
        lock.lock();
        continue;
      }
      cv_.wait_until(lock, std::min(deadline_, now + tick), [&] {
        if (fatal_ || stopping_ || DoneLocked()) return true;
        for (auto& [share, channel] : sender_channels_) {
          if (channel->read_ready) return true;
        }
        return false;
      });
      continue;
    }
    lock.unlock();
    for (auto& [share, channel] : readable) {
      Result<std::optional<Message>> read = channel->pending.Wait();
      if (!read.ok() && ShouldRetry(read.status(), *channel)) {
        OpenSenderStream(share, channel);
        continue;
      }
      if (read.ok()) ++channel->received;
      if (!read.ok()) {
        lock.lock();
        if (IsRefusal(read.status()) && !ShareFinalLocked(share) && owner_pos_[share] == 0) {
          // FAILED_PRECONDITION whatever the reducer's code: the refusal is a fact about this
          // round, not a bad argument of this call (callers retry on it, e.g. the Python step).
          fatal_ = Status(StatusCode::kFailedPrecondition,
                          "refused by reducer " + Name(share) + ": " + read.status().ToString());
        } else {
          OwnerFailedLocked(share, 0, "stream failed: " + read.status().ToString(),
                            ConfirmsDeath(read.status()));
        }
        lock.unlock();
        continue;
      }
      if (!read->has_value()) {
        lock.lock();
        if (!ShareFinalLocked(share)) {
          OwnerFailedLocked(share, 0, "closed its stream before sending every result");
        }
        lock.unlock();
        continue;
      }
      wire::AveragingHeader header;
      Status status = Status::Ok();
      if (!header.ParseFromString((*read)->header) || header.kind() != wire::RESULT) {
        status = Malformed("expected a RESULT message");
      } else {
        status = CheckResult(header, share);
      }
      lock.lock();
      if (status.ok()) status = ApplyResultLocked(share, 0, header, (*read)->payloads);
      if (!status.ok()) {
        OwnerFailedLocked(share, 0, "sent an invalid result: " + status.ToString());
        lock.unlock();
        channel->stream->Cancel();
        continue;
      }
      lock.unlock();
      Notify(RoundEvent::kResultReceived, header.part());
      ArmRead(channel);
    }
    lock.lock();
  }

  if (stopping_ && !fatal_ && !DoneLocked()) {
    fatal_ = Status(StatusCode::kCancelled, "the averaging service stopped");
  }
  // A non-finite vector is the cause to report, even when the round also failed otherwise (its
  // share's backups may have given up on this member meanwhile): the caller must learn that its
  // values are bad, not only that a reducer went away.
  if (!fatal_ || fatal_->code() != StatusCode::kInvalidArgument) {
    if (Status bad = OwnShareInputFiniteLocked(); !bad.ok()) {
      fatal_ = fatal_ ? Status(StatusCode::kInvalidArgument,
                               bad.message() + "; the round also failed: " + fatal_->message())
                      : bad;
    }
  }
  const size_t vector_bytes = partition_.total_elements() * sizeof(float);
  float* const mirror = mirror_;
  mirror_ = nullptr;  // writers that start from here on leave the caller's memory alone
  if (fatal_) {
    // The input stays: a backup may still collect this member's contribution.
    std::shared_ptr<const std::vector<float>> input = input_;
    Status status = *fatal_;
    auto channels = sender_channels_;
    lock.unlock();
    if (input) data = *input;
    Ended(2 * vector_bytes);
    // Our reducers exclude us at once instead of waiting for a sender timeout.
    for (auto& [share, channel] : channels) channel->stream->Cancel();
    if (mirror) {
      // Reads and reductions that took the mirror end before the caller may use it again (the
      // reads are cancelled just above).
      lock.lock();
      cv_.wait(lock, [this] { return !ResultsBeingWrittenLocked(kAnyPart); });
    }
    return status;
  }
  SharedMean outcome;
  AllReduceReport& report = outcome.report;
  report.failed_members.assign(failed_.begin(), failed_.end());
  report.failures = failures_;
  report.takeovers = takeovers_;
  if (contributes_) {
    // Every part is final now, so collects are answered from the results and nobody reads the
    // input any more.
    GiveBackInputLocked(data);
    GatherResults(lock);
    for (size_t p = 0; p < view_.size(); ++p) {
      const Part& part = partition_.parts()[p];
      const PartView& view = view_[p];
      report.parts.push_back(
          PartReport{part.begin, part.size, part.share, view.reduced_by, view.contributors});
    }
    outcome.mean = results_;
  }
  const std::vector<bool> mirrored = mirrored_;
  lock.unlock();  // the service locks itself, then rounds: never the other way round
  if (mirror && results_) {
    // Every part is final and nothing writes results_ any more (GatherResults waited): the parts
    // not mirrored on the way (results on links, a backup's, codecs) are copied from there.
    for (size_t p = 0; p < mirrored.size(); ++p) {
      if (mirrored[p]) continue;
      const Part& part = partition_.parts()[p];
      MirrorCopy(results_->data() + part.begin, MirroredElements(part) * sizeof(float),
                 mirror + part.begin);
    }
    outcome.mirrored = true;
  }
  Ended(vector_bytes);
  return outcome;
}

void Round::Ended(size_t bytes) {
  auto service = service_.lock();
  if (!service) return;
  service->Finished(shared_from_this(), bytes);
  wire::AveragingHeader notice;
  notice.set_kind(wire::DONE);
  notice.set_group_id(group_.id);
  notice.set_group_digest(digest_);
  notice.set_sender(static_cast<uint32_t>(me_));
  std::set<int> dead;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    dead = dead_;
  }
  // Fire and forget: a lost notice only means the others keep the round for grace_period.
  for (int m = 0; m < n_; ++m) {
    if (m == me_ || dead.count(m) != 0) continue;
    node_.Call(group_.members[m].address, methods_[kDone], Encode(notice),
               net::CallOptions{kDoneNoticeTimeout});
  }
}

bool Round::MarkSelfDone() {
  std::lock_guard<std::mutex> lock(mutex_);
  done_.insert(me_);
  return static_cast<int>(done_.size()) == n_;
}

Result<bool> Round::MarkPeerDone(int member, const net::PeerId& peer, const std::string& digest) {
  if (digest != digest_) return Refused("group description differs");
  if (member < 0 || member >= n_) {
    return Malformed("sender index " + std::to_string(member) + " out of range");
  }
  // Only Run's end may mark this member done: the round must not be released while it runs.
  if (member == me_) return Malformed("a DONE notice from myself");
  if (peer != group_.members[member].address.peer_id) {
    return Status(StatusCode::kPermissionDenied,
                  "peer " + peer.ShortString() + " claims to be " + Name(member));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  done_.insert(member);
  return static_cast<int>(done_.size()) == n_;
}

void Round::GiveBackInputLocked(std::vector<float>& data) {
  std::shared_ptr<std::vector<float>> input = std::move(input_);
  if (input.use_count() == 1) {
    // No other reference is left to copy, so the count cannot rise again; the fence orders the
    // transport's last reads of the buffer (before its release) before the caller's writes.
    std::atomic_thread_fence(std::memory_order_acquire);
    data = std::move(*input);
  } else {
    data.clear();
  }
}

void Round::GatherResults(std::unique_lock<std::mutex>& lock) {
  // A reduction that lost its share to a backup may still be writing its (abandoned) values, and
  // a reducer that was taken over may still be sending a result into results_ (its stream is
  // cancelled now, every part being final); the final values must land after them. Pump and
  // ResultPlaced notify when those end.
  if (receiving_ > 0) {
    std::vector<Stream*> stale;
    for (size_t p = 0; p < placement_.size(); ++p) {
      if (placement_[p] != Placement::kReceiving) continue;
      auto channel = sender_channels_.find(partition_.parts()[p].share);
      if (channel != sender_channels_.end()) stale.push_back(channel->second->stream);
    }
    lock.unlock();
    for (Stream* stream : stale) stream->Cancel();
    lock.lock();
  }
  cv_.wait(lock, [this] { return !ResultsBeingWrittenLocked(kAnyPart); });
  // Only the ranges of parts whose values live elsewhere are written: nothing else reads or
  // writes those (results are decoded into results_ only for a part not final yet).
  std::vector<float> scratch;
  for (size_t p = 0; p < view_.size(); ++p) {
    const Part& part = partition_.parts()[p];
    float* target = results_->data() + part.begin;
    if (view_[p].values.data() == reinterpret_cast<const uint8_t*>(target)) continue;
    std::memcpy(target, FloatsOf(view_[p].values, scratch), part.size * sizeof(float));
  }
}

// ---------------------------------------------------------------------------------------------
// Service

void AllReduceService::Impl::SweepLocked() {
  retired_.clear();
  const auto now = Clock::now();
  while (!finished_.empty()) {
    const FinishedRound& oldest = finished_.front();
    const bool expired = now >= oldest.at + options.grace_period;
    const bool over_budget = finished_.size() > 1 && (finished_bytes_ > options.grace_bytes ||
                                                      finished_.size() > options.grace_rounds);
    if (!expired && !over_budget) break;
    rounds_.erase(oldest.id);
    if (!expired && released_.insert(oldest.id).second) {
      released_order_.emplace_back(now, oldest.id);
    }
    finished_bytes_ -= oldest.bytes;
    finished_.pop_front();
  }
  while (!released_order_.empty() && now >= released_order_.front().first + options.grace_period) {
    released_.erase(released_order_.front().second);
    released_order_.pop_front();
  }
}

void AllReduceService::Impl::Finished(const std::shared_ptr<Round>& round, size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::string& id = round->id();
  if (stopping_ || rounds_.count(id) == 0) return;
  finished_.push_back(FinishedRound{Clock::now(), id, bytes});
  finished_bytes_ += bytes;
  if (round->MarkSelfDone()) ReleaseLocked(id);
}

Status AllReduceService::Impl::MemberDone(const wire::AveragingHeader& notice,
                                          const net::PeerId& peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = rounds_.find(notice.group_id());
  if (it == rounds_.end()) return Status::Ok();  // released already, or never ran here
  auto all_done =
      it->second->MarkPeerDone(static_cast<int>(notice.sender()), peer, notice.group_digest());
  if (!all_done.ok()) return all_done.status();
  if (*all_done) ReleaseLocked(notice.group_id());
  return Status::Ok();
}

void AllReduceService::Impl::ReleaseLocked(const std::string& id) {
  if (auto it = rounds_.find(id); it != rounds_.end()) {
    retired_.push_back(std::move(it->second));
    rounds_.erase(it);
  }
  auto it = std::find_if(finished_.begin(), finished_.end(),
                         [&](const FinishedRound& round) { return round.id == id; });
  if (it != finished_.end()) {
    finished_bytes_ -= it->bytes;
    finished_.erase(it);
  }
  if (released_.insert(id).second) released_order_.emplace_back(Clock::now(), id);
}

Status AllReduceService::Impl::Register(const std::shared_ptr<Round>& round) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopping_) return Status(StatusCode::kCancelled, "the averaging service stopped");
  SweepLocked();
  if (released_.count(round->id()) != 0 || !rounds_.emplace(round->id(), round).second) {
    return Status(StatusCode::kFailedPrecondition,
                  "a round with this group id is already running or recently finished");
  }
  registered_.notify_all();
  return Status::Ok();
}

std::shared_ptr<Round> AllReduceService::Impl::WaitForRound(const std::string& id,
                                                            Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  std::shared_ptr<Round> round;
  registered_.wait_until(lock, deadline, [&] {
    auto it = rounds_.find(id);
    if (it != rounds_.end()) round = it->second;
    return round != nullptr || stopping_ || released_.count(id) != 0;
  });
  return stopping_ ? nullptr : round;
}

void AllReduceService::Impl::Spawn(std::function<void()> task) {
  std::lock_guard<std::mutex> lock(workers_mutex_);
  if (workers_closed_) return;
  // Join the workers that ended, so a long-lived service does not accumulate threads.
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (it->done->load()) {
      it->thread.join();
      it = workers_.erase(it);
    } else {
      ++it;
    }
  }
  auto done = std::make_shared<std::atomic<bool>>(false);
  workers_.push_back(Worker{std::thread([task = std::move(task), done] {
                              task();
                              done->store(true);
                            }),
                            done});
}

void AllReduceService::Impl::Stop() {
  std::vector<std::shared_ptr<Round>> rounds;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    for (auto& [id, round] : rounds_) rounds.push_back(round);
    rounds_.clear();
    rounds.insert(rounds.end(), retired_.begin(), retired_.end());
    retired_.clear();
    registered_.notify_all();
  }
  for (auto& round : rounds) round->Stop();
  std::list<Worker> workers;
  {
    std::lock_guard<std::mutex> lock(workers_mutex_);
    workers_closed_ = true;
    workers.swap(workers_);
  }
  for (auto& worker : workers) {
    if (worker.thread.get_id() == std::this_thread::get_id()) {
      worker.thread.detach();
    } else {
      worker.thread.join();
    }
  }
}

Status AllReduceService::Impl::Serve(const net::CallContext& context, Stream& stream,
                                     wire::Kind expected) {
  auto wait_until = std::min(context.deadline, Clock::now() + options.registration_wait);
  auto first = stream.Read().WaitFor(options.registration_wait);
  if (!first) return Status(StatusCode::kDeadlineExceeded, "no first message");
  if (!first->ok()) return first->status();
  if (!first->value().has_value()) return Malformed("empty stream");
  wire::AveragingHeader header;
  if (!header.ParseFromString(first->value()->header) || header.kind() != expected) {
    return Malformed("unexpected first message");
  }
  if (header.group_id().empty() || header.group_id().size() > Group::kMaxIdBytes) {
    return Malformed("bad group id");
  }
  // A member may start streaming before this peer has started the same round: wait (bounded).
  auto round = WaitForRound(header.group_id(), wait_until);
  if (!round) {
    return Status(StatusCode::kNotFound, "no averaging round with this group id on this peer");
  }
  switch (expected) {
    case wire::OPEN:
      return round->ServeSender(context, stream, header);
    case wire::COLLECT:
      return round->ServeCollect(context, stream, header);
    case wire::TAKEOVER:
      return round->ServeTakeover(stream, header);
    default:
      return Malformed("unexpected message kind");
  }
}

AllReduceService::AllReduceService(net::Node& node, AllReduceServiceOptions options)
    : impl_(std::make_shared<Impl>(node, std::move(options))) {
  std::weak_ptr<Impl> weak = impl_;
  auto serve = [weak](wire::Kind kind) {
    return [weak, kind](const net::CallContext& context, Stream& stream) {
      auto impl = weak.lock();
      if (!impl) return Status(StatusCode::kUnavailable, "the averaging service stopped");
      return impl->Serve(context, stream, kind);
    };
  };
  node.RegisterStream(impl_->Method("allreduce"), serve(wire::OPEN));
  node.RegisterStream(impl_->Method("collect"), serve(wire::COLLECT));
  node.RegisterStream(impl_->Method("takeover"), serve(wire::TAKEOVER));
  node.RegisterUnary(impl_->Method("done"), [weak](const net::CallContext& context,
                                                   net::Message request, net::Responder respond) {
    auto impl = weak.lock();
    wire::AveragingHeader notice;
    Status status = Status::Ok();
    if (!impl) {
      status = Status(StatusCode::kUnavailable, "the averaging service stopped");
    } else if (!notice.ParseFromString(request.header) || notice.kind() != wire::DONE) {
      status = Malformed("expected a DONE notice");
    } else {
      status = impl->MemberDone(notice, context.peer);
    }
    if (status.ok()) {
      respond(net::Message());
    } else {
      respond(status);
    }
  });
  // Answered by any live peer: reducers probe senders that are late to open their streams.
  node.RegisterUnary(impl_->Method("ping"),
                     [](const net::CallContext&, net::Message, net::Responder respond) {
                       respond(net::Message());
                     });
}

AllReduceService::~AllReduceService() { impl_->Stop(); }

size_t AllReduceService::kept_rounds() const { return impl_->KeptRounds(); }

Result<AllReduceReport> AllReduceService::AllReduce(const Group& group, std::vector<float>& data,
                                                    float weight, const AllReduceOptions& options) {
  const size_t size = data.size();
  auto shared = AllReduceShared(group, data, weight, options);
  if (!shared.ok()) return shared.status();
  if (shared->mean && size > 0) {
    data.resize(size);  // no allocation unless the transport kept the input's storage
    std::memcpy(data.data(), shared->mean->data(), size * sizeof(float));
  }
  return std::move(shared->report);
}

Result<SharedMean> AllReduceService::AllReduceShared(const Group& group, std::vector<float>& data,
                                                     float weight,
                                                     const AllReduceOptions& options) {
  Status valid = group.Validate();
  if (!valid.ok()) return valid;
  bool contributes = group.members[group.my_index].contributes();
  if (contributes && (!std::isfinite(weight) || weight <= 0 || weight > options.max_weight)) {
    return Status(StatusCode::kInvalidArgument,
                  "weight " + std::to_string(weight) + " is not in (0, max_weight]");
  }
  if (options.timeout.count() <= 0 || options.sender_timeout.count() <= 0 ||
      options.reducer_timeout.count() <= 0) {
    return Status(StatusCode::kInvalidArgument, "all-reduce timeouts must be positive");
  }
  if (options.mirror_elements > data.size() ||
      (options.mirror == nullptr && options.mirror_elements > 0)) {
    return Status(StatusCode::kInvalidArgument,
                  "the mirror of " + std::to_string(options.mirror_elements) +
                      " elements is not within the vector of " + std::to_string(data.size()));
  }
  auto partition = Partition::Make(group, data.size(), options.part_elements);
  if (!partition.ok()) return partition.status();
  auto codec = PartCodec::Make(options.codecs, data.size());
  if (!codec.ok()) return codec.status();
  auto round =
      std::make_shared<Round>(*impl_, group, std::move(partition).value(), std::move(codec).value(),
                              options, contributes ? weight : 0.0);
  return round->Run(data);
}

}  // namespace hivemind::averaging
