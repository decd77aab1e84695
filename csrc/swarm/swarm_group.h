// The averaging group of the c10d backend: every live rank of every launch that joined it, in one
// order that all members hold identically.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "net/address.h"
#include "net/peer_id.h"

namespace hivemind::swarm {

struct SwarmMember {
  net::PeerAddress address;
  std::string launch_id;  // same for every rank of one launch (one torchrun, one script start)
  int rank = 0;           // the member's rank within its launch
  int launch_size = 1;    // the world size of its launch: SUM scales each contribution by it

  std::string Describe() const;  // "rank 2 of launch 3f2a.. (peer 12D3Koo..)" for errors
};

struct SwarmGroup {
  std::string id;  // printable (HexId), unique per group; the all-reduce rounds are keyed by it
  std::vector<SwarmMember> members;
  int my_index = -1;

  // Hex BLAKE2b-128 of the id and the members' peer ids, in order: equal on two peers exactly when
  // they hold the same group. Presence records carry it, so that two parts of one group that
  // disagree on who is still in it (a spuriously excluded live member) see each other as apart.
  std::string Fingerprint() const;

  // Text form without my_index; Decode finds `me` in it.
  std::string Encode() const;
  static Result<SwarmGroup> Decode(std::string_view text, const net::PeerId& me);
};

// Lower-case hex of arbitrary bytes (group ids come from matchmaking as random bytes).
std::string HexId(std::string_view bytes);

// One member per line (the matchmaking metadata of a launch, and the body of SwarmGroup).
std::string EncodeMembers(const std::vector<SwarmMember>& members);
Result<std::vector<SwarmMember>> DecodeMembers(std::string_view text);

}  // namespace hivemind::swarm
