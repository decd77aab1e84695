// The swarm side of the c10d backend's all-reduce: keeps an averaging group of every live rank of
// every launch that shares the run id, and runs consecutive rounds in it without new matchmaking
// until its membership changes (a "persistent group").
//
//  * Formation: the lowest live rank of each launch (its leader) checks which of its ranks are
//    alive, then either takes them as the whole group (standalone launch) or matchmakes over the
//    DHT on behalf of the launch, and hands the group to its ranks through the mailbox. A launch
//    therefore never splits across groups.
//  * Rounds: op k of group G is the all-reduce round "G/k" (butterfly, fault-tolerant; see
//    averaging/allreduce.h). Every member gets bitwise identical results and the same per-part
//    contributor lists, so every member drops the same dead members afterwards: departures cost
//    no extra round trip.
//  * Regrouping: launch leaders publish which group they are in (its fingerprint: id and
//    members) under a DHT key of the run, and read the others' entries every second. A leader
//    that sees a launch outside its group (a newcomer, a group that formed apart, or a live
//    member the group dropped) wants a regroup and votes for it through one extra
//    element appended to the averaged vector; the mean is identical everywhere, so every member
//    re-forms at the same op: the next one with the "anchor" signature (that of the op the first
//    group formed at, i.e. the first all-reduce of a training step), where a newcomer's first
//    all-reduce also stands. Matchmaking only groups launches waiting at the same anchor; a launch
//    left without a group mid-step finishes the step on its own and matchmakes at the next one.
//
// Not thread-safe: the backend calls it from its single operation thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "averaging/allreduce.h"
#include "averaging/group_key.h"
#include "common/status.h"
#include "net/address.h"
#include "swarm/mailbox.h"
#include "swarm/swarm_group.h"

namespace hivemind::averaging {
class Matchmaker;
}
namespace hivemind::dht {
class DhtRunner;
}

namespace hivemind::swarm {

struct LaunchInfo {
  std::string launch_id;  // equal on every rank of the launch (agreed via the store)
  int rank = 0;
  std::vector<net::PeerAddress> ranks;  // index = rank; size = the launch's world size
};

struct SwarmOptions {
  // Empty: no matchmaking, the group is this launch's live ranks. Otherwise the DHT key under
  // which launch leaders meet (derived from the run id).
  std::string matchmaking_key;
  // Launches (not ranks) the first group of a fresh swarm waits for (later groups and joiners
  // take whoever is there), and the most a group takes (0: no cap).
  int min_group_size = 1;
  int target_group_size = 0;
  // With target_group_size > 0, groups are cells of a Moshpit grid of this many dimensions
  // (side target_group_size) and re-form along the next dimension every `moshpit_period` anchor
  // ops (training steps), so that every launch's state mixes with every other's
  // (docs/matchmaking.md, "Moshpit grid"). Newcomers get in at those rotations.
  int moshpit_dims = 2;
  int moshpit_period = 10;
  // How long a matchmaking leader waits for more launches before sealing a group below target.
  std::chrono::milliseconds matchmaking_time{2000};
  std::chrono::milliseconds request_timeout{1000};
  // How often launch leaders publish their group and look for launches outside it.
  std::chrono::milliseconds presence_period{1000};
  // How long the launch leader waits for a rank's answer when checking that it is alive.
  std::chrono::milliseconds liveness_timeout{2000};
  // Per-round limits of the butterfly all-reduce; `timeout` is replaced by the op's deadline.
  averaging::AllReduceOptions allreduce;
};

struct MeanReport {
  SwarmGroup group;               // the group the round ran in
  std::vector<int> contributors;  // indices in `group` whose data is in every part of the mean
  std::vector<std::string> failures;
  // The mean, read-only (shared with the round): its first n elements, n = data's size at the call.
  std::shared_ptr<const std::vector<float>> mean;
  bool mirrored = false;  // MeanShared's `mirror` holds the mean's first mirror_elements too
};

class SwarmAverager {
 public:
  // `matchmaker` and `dht` may be null when options.matchmaking_key is empty. All referenced
  // objects must outlive the averager.
  SwarmAverager(Mailbox& mailbox, averaging::AllReduceService& allreduce,
                averaging::Matchmaker* matchmaker, dht::DhtRunner* dht, LaunchInfo launch,
                SwarmOptions options);
  ~SwarmAverager();
  SwarmAverager(const SwarmAverager&) = delete;
  SwarmAverager& operator=(const SwarmAverager&) = delete;

  // Replaces `data` by the weighted mean over the contributors. Every contributor ends with
  // bitwise identical data; on error `data` is unchanged (unless the others dropped this rank
  // mid-round: then it may be empty) and the next op forms a new group. Its storage may be
  // replaced (AllReduceService::AllReduce): re-read data.data() afterwards.
  // `signature` names the kind of op (dtype, size): regrouping waits for the anchor signature.
  // `codecs`: ranges of `data` sent compressed (averaging::AllReduceOptions::codecs).
  Result<MeanReport> Mean(std::vector<float>& data, Clock::time_point deadline,
                          const std::string& signature, float weight = 1.0f,
                          std::vector<averaging::CodecRange> codecs = {});
  // Mean without the copy into `data` (AllReduceService::AllReduceShared): the mean is
  // report.mean. On success `data` holds the input again or is left empty; on error it is
  // unchanged. `input_checked`: the caller has checked `data` is finite
  // (averaging::AllReduceOptions::input_checked). `mirror`: where the round also writes the
  // mean's first `mirror_elements` values (averaging::AllReduceOptions::mirror); report.mirrored
  // says whether it did (not when this rank is alone, for one).
  Result<MeanReport> MeanShared(std::vector<float>& data, Clock::time_point deadline,
                                const std::string& signature, float weight = 1.0f,
                                std::vector<averaging::CodecRange> codecs = {},
                                bool input_checked = false, float* mirror = nullptr,
                                size_t mirror_elements = 0);

  // Every member's `mine`, in group order (this member's own included). Any member that fails to
  // send fails the op (naming it) and the next op forms a new group.
  Result<std::pair<SwarmGroup, std::vector<net::Payload>>> AllGather(net::Payload mine,
                                                                     Clock::time_point deadline,
                                                                     const std::string& signature);

  // Thread-safe: asks the group to re-form at the next anchor op (newcomers get in).
  void RequestRegroup() { regroup_wanted_ = true; }
  // Thread-safe: how many groups this peer has formed or joined (not counting shrinks). A change
  // between two training steps means others may have joined: their state needs syncing.
  uint64_t generation() const { return generation_.load(); }
  // Thread-safe: whether another launch of the run has published a formed group in the DHT
  // (a process that sees one is joining a running swarm). False in standalone mode.
  bool SwarmIsRunning();
  // Thread-safe: this peer joins a running swarm, so it never waits for min_group_size launches
  // (the first group of a fresh swarm does).
  void SetJoining() { joining_ = true; }

  // The current group, if one is formed (for logs and tests).
  const std::optional<SwarmGroup>& group() const { return group_; }
  const LaunchInfo& launch() const { return launch_; }

 private:
  Status EnsureGroup(Clock::time_point deadline, const std::string& signature);
  // `matchmake` false: the group is this launch's live ranks, even in a swarm.
  Status Form(Clock::time_point deadline, bool matchmake);
  Result<SwarmGroup> LeadFormation(const std::string& key, Clock::time_point deadline,
                                   bool matchmake);
  void Formed(SwarmGroup group);
  // The presence thread: publishes this launch's group, reads the others', wants regroups.
  void PresenceLoop();
  void PublishAndCheckPresence();
  void Shrink(const std::vector<int>& keep);
  bool moshpit() const {
    return !options_.matchmaking_key.empty() && options_.target_group_size > 0;
  }
  std::string NextOpId();

  Mailbox& mailbox_;
  averaging::AllReduceService& allreduce_;
  averaging::Matchmaker* matchmaker_;
  LaunchInfo launch_;
  SwarmOptions options_;

  std::vector<bool> launch_alive_;  // which ranks of this launch are believed alive
  std::optional<SwarmGroup> group_;
  std::string base_id_;  // id of the group as formed; shrinks derive new ids from it
  int shrinks_ = 0;
  uint64_t op_index_ = 0;
  int epoch_ = 0;       // formations so far; identical on every rank of the launch
  Status dropped_;      // set once the others dropped this rank from a standalone launch's group
  std::string anchor_;  // signature of the op the first group formed at
  int anchors_in_group_ = 0;  // anchor ops run in the current group (Moshpit rotation)
  std::optional<averaging::GroupKeyManager> keys_;  // Moshpit grid position (leaders only)
  bool regroup_agreed_ = false;  // the group voted to re-form at the next anchor op
  std::atomic<bool> regroup_wanted_{false};
  std::atomic<bool> joining_{false};
  std::atomic<uint64_t> generation_{0};

  dht::DhtRunner* dht_;
  std::string presence_key_;
  std::mutex presence_mutex_;  // guards the fields below, shared with the presence thread
  std::condition_variable presence_wake_;
  bool presence_stop_ = false;
  bool leading_ = false;      // this rank is its launch's leader
  std::string published_id_;  // fingerprint of the current group ("" until the first one)
  double formed_at_ = 0;      // DHT time of that formation or of its last shrink
  std::thread presence_thread_;
};

}  // namespace hivemind::swarm
