// Butterfly all-reduce of a float32 vector within one group, over net::Node streams, surviving the
// death of senders and reducers. Algorithm, wire format and guarantees: docs/averaging.md.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "averaging/group.h"
#include "averaging/part_codec.h"
#include "averaging/partition.h"
#include "common/status.h"
#include "net/node.h"

namespace hivemind::averaging {

// Points of a round that tests use to inject failures (chaos tests kill a node at one of them).
enum class RoundEvent {
  kStarted,         // the round is registered; nothing sent yet
  kPartSent,        // one of my parts was handed to a reducer's stream
  kPartReduced,     // I finished reducing one part (as reducer or backup)
  kResultReceived,  // I received one averaged part from another member
};

struct AllReduceOptions {
  // Whole round, from the call to the result. Every wait inside is bounded by it.
  std::chrono::milliseconds timeout{60000};
  // A reducer excludes a sender that has not connected, or sent nothing, for this long.
  std::chrono::milliseconds sender_timeout{10000};
  // A sender that has not opened its stream after this long is pinged (again every period); one
  // that cannot be reached at all by two pings in a row is excluded then rather than after
  // sender_timeout, so a peer that died between rounds costs about two periods. Late but live
  // senders are still waited for.
  // Zero disables the probes.
  std::chrono::milliseconds liveness_probe{500};
  // A member declares a reducer failed when a share makes no progress for this long (and at once
  // when the reducer's stream breaks). Keep it above sender_timeout: a reducer waits that long
  // for a silent sender before it can publish anything.
  std::chrono::milliseconds reducer_timeout{20000};
  // Elements per part; every member must use the same value.
  size_t part_elements = kDefaultPartElements;
  // Weights above this (or non-finite, or <= 0) are refused, locally and from the wire.
  double max_weight = 1e9;
  // Ranges of the vector sent compressed (parts and results), sorted and disjoint; the rest
  // travels as raw float32. Every member must pass the same ranges. With a lossy codec the mean
  // is computed from the decoded contributions (a reducer's own contribution is exact) and every
  // member, the reducer included, ends with the decoded result, so results stay identical.
  std::vector<CodecRange> codecs;
  // The caller has checked that its vector is finite (the c10d backend does it in the pass that
  // fills the vector), so the round skips its own check. A false claim harms only this member:
  // every reducer checks the parts it receives and excludes their sender.
  bool input_checked = false;
  // Shares of at least this many bytes (as float32) are sent on direct streams: a TCP connection
  // of their own per sender and reducer, when both nodes allow it (net::CallOptions::direct,
  // docs/transport.md). Smaller ones, and every share when this is 0, use the node's link. Unset:
  // 512 KiB on a node without encryption (below it the link is as fast: the stream's threads and
  // its round trip to start, on a connection kept from the last round, cost what the link's extra
  // copies do) and 256 KiB on one with encryption (sealed direct streams beat CURVE links from
  // there on; docs/benchmarks.md).
  std::optional<size_t> direct_stream_bytes;
  // Optional: memory of the caller's (the c10d backend's tensor) where a successful round also
  // leaves the mean's first mirror_elements values, written while they are in the cache: results
  // received on direct streams as they arrive, the member's own share as it is reduced, the rest
  // as the round ends. Saves the caller a pass over a cold copy of the mean. Only a contributor
  // writes it; nothing is written there after the round returns, and after an error it holds a
  // mix of what it held and averaged values.
  float* mirror = nullptr;
  size_t mirror_elements = 0;
  // Test hook: called (from any thread, without locks held) at the points above. Must not block.
  std::function<void(RoundEvent, size_t part)> observer;
};

struct PartReport {
  size_t begin = 0;  // element range [begin, begin + size) of the vector
  size_t size = 0;
  int share = -1;                 // the member that was to reduce it
  int reduced_by = -1;            // the member that did (a backup when `share` died)
  std::vector<int> contributors;  // member indices whose vectors are in this part's mean
};

struct AllReduceReport {
  std::vector<PartReport> parts;      // empty for an auxiliary member (it receives no result)
  std::vector<int> failed_members;    // members this peer saw die, time out or get excluded
  std::vector<std::string> failures;  // one human-readable line per failure seen
  int takeovers = 0;                  // shares this peer re-reduced for a dead reducer
};

// A successful round's mean, shared read-only with the round, which serves it to takeovers during
// its grace period (docs/averaging.md, "Fault tolerance").
struct SharedMean {
  AllReduceReport report;
  std::shared_ptr<const std::vector<float>> mean;  // null for an auxiliary member
  bool mirrored = false;  // AllReduceOptions::mirror holds the mean's first mirror_elements
};

struct AllReduceServiceOptions {
  // Stream methods are "<prefix>.allreduce", "<prefix>.collect" and "<prefix>.takeover"; unary
  // "<prefix>.ping" answers liveness probes.
  std::string method_prefix = "averaging.v1";
  // How long a stream that arrives before its round has started waits for it.
  std::chrono::milliseconds registration_wait{10000};
  // A finished round keeps its inputs and results this long, to answer a backup that takes over
  // the share of a reducer that died after this peer got its result. Should be >= the timeout
  // of the rounds.
  std::chrono::milliseconds grace_period{60000};
  // ... but finished rounds hold their results (the size of the vector each), so beyond this many
  // bytes the oldest are released early (the newest one is always kept). A backup that asks a
  // released round is refused at once; it then reduces without that member's result.
  size_t grace_bytes = size_t{512} << 20;
  // ... and beyond this many finished rounds (small rounds of a fast DDP run add up too).
  size_t grace_rounds = 1024;
  // Idle buffers kept for the next rounds' input copies and reduced shares (at most 4 buffers).
  size_t pooled_bytes = size_t{1} << 30;
};

// Serves the reducer side of every round on `node` and runs rounds. Several rounds (different
// group ids) may run at once from different threads. Must outlive the rounds it runs; the node
// must outlive the service.
class AllReduceService {
 public:
  explicit AllReduceService(net::Node& node, AllReduceServiceOptions options = {});
  ~AllReduceService();
  AllReduceService(const AllReduceService&) = delete;
  AllReduceService& operator=(const AllReduceService&) = delete;

  // Replaces `data` by the weighted mean sum(w_i x_i) / sum(w_i) over the contributors of each
  // part; every successful contributor ends with bitwise identical data. `weight` is ignored for
  // auxiliary members (they contribute nothing and their `data` is left unchanged; its size still
  // must match). On error `data` is unchanged. A contributor's storage is taken over for the
  // round (no copy) and usually given back holding the results, but may be replaced by another
  // buffer of the same size: pointers into `data` must be re-read afterwards. A vector with
  // inf/NaN fails with INVALID_ARGUMENT naming the range, and the group goes on without it.
  Result<AllReduceReport> AllReduce(const Group& group, std::vector<float>& data, float weight,
                                    const AllReduceOptions& options = {});

  // The same round without the copy of the mean into `data`: the mean comes back shared with the
  // round, read-only. A contributor's `data` is taken over for the round; on success it holds the
  // input again (its own storage, for the caller to reuse) or is left empty when the transport
  // still holds that storage; on error it is unchanged. An auxiliary member's is never touched.
  Result<SharedMean> AllReduceShared(const Group& group, std::vector<float>& data, float weight,
                                     const AllReduceOptions& options = {});

  // Rounds this service keeps: running, or finished and not released yet (tests, diagnostics).
  size_t kept_rounds() const;

  class Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace hivemind::averaging
