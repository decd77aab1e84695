// The description of one averaging group that every member holds identically.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "net/address.h"

namespace hivemind::averaging {

// What a member does in a round (hivemind's AveragingMode).
enum class MemberMode {
  kNormal,     // contributes its vector and reduces a share
  kClient,     // contributes, reduces nothing (e.g. behind NAT: nobody can dial it)
  kAuxiliary,  // reduces a share for others, contributes nothing and receives no result
};

const char* MemberModeName(MemberMode mode);

// A member that did not declare its bandwidth: the load balancer assumes the mean of the declared
// ones (1 when nobody declared), as hivemind does for `bandwidth=None`.
constexpr double kUndeclaredBandwidth = -1.0;

// Finite and >= 0, or kUndeclaredBandwidth.
bool IsValidBandwidth(double bandwidth);

struct GroupMember {
  net::PeerAddress address;
  // Relative link capacity (declared bandwidth); shares are balanced by it (load_balance.h); 0
  // means "never reduce". Ignored (treated as 0) for clients.
  double bandwidth = 1.0;
  MemberMode mode = MemberMode::kNormal;

  bool contributes() const { return mode != MemberMode::kAuxiliary; }
  bool can_reduce() const { return mode != MemberMode::kClient && bandwidth != 0; }
};

// Everyone in the group must hold the same `id` and the same ordered `members` (matchmaking hands
// them out); only `my_index` differs. Digest() lets peers check that they agree.
struct Group {
  std::string id;  // opaque bytes, unique per round (the key that routes streams to the round)
  std::vector<GroupMember> members;
  int my_index = -1;

  static constexpr size_t kMaxMembers = 4096;
  static constexpr size_t kMaxIdBytes = 256;

  // Checks sizes, my_index, bandwidths (IsValidBandwidth) and that someone can reduce.
  Status Validate() const;
  // 32-byte fingerprint of id, members (peer ids, modes, bandwidths) in order; not of my_index.
  std::string Digest() const;
  // Member indices that may reduce, in group order: the order in which reducers back up a dead
  // reducer's share.
  std::vector<int> ReducerOrder() const;
};

}  // namespace hivemind::averaging
