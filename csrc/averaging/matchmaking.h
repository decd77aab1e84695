// Matchmaking: peers that look for an averaging group under the same DHT key find each other and
// all leave with the same Group (id, ordered members) plus every member's small metadata.
//
// Protocol (docs/matchmaking.md has the whole story and the timings):
//   1. declare: store {addresses, declared time, search id} in the DHT under the group key, with a
//      signed per-peer subkey;
//   2. read the declarations; the earliest declared (ties: smaller peer id) is the leader; every
//      peer asks earlier peers, earliest first, to take it ("join", answered at once);
//   3. a peer that is not (yet) following anyone accepts later peers; when it gets accepted by an
//      earlier one it redirects its own followers there;
//   4. the leader seals the group as soon as it holds target_group_size peers, or at the end of
//      its window if it holds at least min_group_size, and sends every member the group: a random
//      id, a shuffled order and everyone's metadata;
//   5. a follower whose leader fails (it checks on it while waiting), refuses or disbands tries the
//      next candidate or leads itself; at the overall timeout the search fails with an error that
//      says why.
//
// This header includes no protobuf: the torch extension includes it.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "averaging/group.h"
#include "common/status.h"

namespace hivemind::dht {
class DhtRunner;
}

namespace hivemind::averaging {

class MatchmakingEnv;

struct MatchmakingOptions {
  // Where to declare: GroupKeyManager::CurrentKey() (run id + schema + grid coordinates).
  std::string group_key;
  // The tensor layout. Peers with different hashes are never grouped, even under one key.
  std::string schema_hash;
  // Handed to every member of the group (an all-gather for free). At most max_metadata_bytes.
  std::string metadata;
  // GroupMember::bandwidth: declared, or kUndeclaredBandwidth.
  double bandwidth = 1.0;
  MemberMode mode = MemberMode::kNormal;

  int min_group_size = 2;
  // The leader seals the group the moment it has this many members. 0: no cap other than
  // Group::kMaxMembers (then only the window ends the search).
  int target_group_size = 0;
  // How long a leader waits for followers before it seals a group smaller than the target. On a
  // LAN a join takes well under a millisecond; the window is there for peers that start late.
  std::chrono::milliseconds window{500};
  // Bound on the whole FormGroup call.
  std::chrono::milliseconds timeout{5000};
  // Bound on each RPC (join, group hand-out) and the margin a follower adds to the leader's
  // promised seal time before it gives up on that leader.
  std::chrono::milliseconds request_timeout{500};
  // How often a peer that leads (nobody earlier took it) re-reads the declarations, to catch
  // earlier peers whose declarations reached the DHT late and leaders that fell back.
  std::chrono::milliseconds poll_period{50};
  size_t max_metadata_bytes = size_t{16} << 10;
  // Optional: set it (from any thread) to end this search with CANCELLED, then call
  // Matchmaker::WakeSearches() so that a waiting search notices at once. A search that starts
  // with it already set fails at once. Lets one user of a shared Matchmaker stop its own search.
  std::shared_ptr<const std::atomic<bool>> cancelled;
};

struct FormedGroup {
  Group group;
  // metadata[i] is what member i passed in MatchmakingOptions::metadata.
  std::vector<std::string> metadata;
  std::string group_key;
  bool led = false;  // this peer was the leader
  // Members the leader could not confirm had received the group (they may have given up just
  // before it was sealed); the all-reduce treats them like any peer that fails to show up.
  std::vector<int> unconfirmed_members;
  double seconds = 0;  // how long FormGroup took
};

// Serves and runs matchmaking for one peer: declares in its DHT and registers the
// "matchmaking.v1.*" methods on its node (through a MatchmakingEnv, matchmaking_env.h), so one
// Matchmaker per DhtRunner. Thread-safe; several FormGroup calls may run at once as long as their
// group keys differ.
class Matchmaker {
 public:
  // A real peer: `dht` (which must outlive the Matchmaker) and its node.
  explicit Matchmaker(dht::DhtRunner& dht);
  // Any peer that offers what matchmaking_env.h lists, e.g. one of a SimMatchmakingWorld's.
  explicit Matchmaker(std::shared_ptr<MatchmakingEnv> env);
  // Ends the searches in progress (they fail with CANCELLED); later requests are refused.
  ~Matchmaker();
  Matchmaker(const Matchmaker&) = delete;
  Matchmaker& operator=(const Matchmaker&) = delete;

  // Blocks until a group is formed or options.timeout passes. Errors: INVALID_ARGUMENT (bad
  // options), FAILED_PRECONDITION (a search under this key is already running here),
  // UNAVAILABLE (could not declare in the DHT), DEADLINE_EXCEEDED (no group of
  // min_group_size; the message says how many peers declared, who refused and why), CANCELLED.
  Result<FormedGroup> FormGroup(const MatchmakingOptions& options);

  void Shutdown();
  // Wakes every waiting search to check its `cancelled` flag.
  void WakeSearches();

  struct Shared;

 private:
  std::shared_ptr<MatchmakingEnv> env_;
  std::shared_ptr<Shared> shared_;
};

}  // namespace hivemind::averaging
