// Moshpit group keys: which DHT key a peer declares itself under when it looks for an averaging
// group, and how that key moves after each round so that consecutive groups mix along different
// dimensions of a virtual grid (see docs/matchmaking.md, "Moshpit grid").
//
// Pure logic: no network, no clock, deterministic. A simulation can drive hundreds of managers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace hivemind::averaging {

// The key a peer declares under: "<prefix>.s<schema>.g<c1>.<c2>...". The schema part is the hex of
// the first 16 bytes of the schema hash, so peers whose tensors differ never read each other's
// declarations (the join request still carries the full hash, which the leader checks). A flat
// (one-dimensional) grid has no coordinates: "<prefix>.s<schema>.g".
std::string MakeGroupKey(const std::string& prefix, const std::string& schema_hash,
                         const std::vector<int>& coordinates);

// The coordinates that the members of one assembled group move to: `group_size` values in
// [0, grid_side), distinct whenever group_size <= grid_side, drawn by a portable PRNG seeded from
// the group id. Every member computes the same list and takes entry `my_index`, so no extra
// message is needed. Random rather than just `my_index` so that groups smaller than the grid side
// (partial grids, dropouts) do not all crowd the low coordinates.
std::vector<int> NextCoordinates(const std::string& group_id, int group_size, int grid_side);

struct GroupKeyOptions {
  std::string prefix;       // run id (the swarm); must be non-empty and contain no '.'
  std::string schema_hash;  // bytes that identify the tensor layout; may be empty
  // M: the side of the grid, i.e. the intended group size. Matchmaking's target_group_size should
  // equal it.
  int grid_side = 1;
  // d: the number of grid dimensions. N = M^d peers reach the exact global mean after d rounds.
  // d = 1 is a flat grid: a single key, every peer in one group (capped by target_group_size).
  int grid_dims = 1;
  // d - 1 values in [0, grid_side). Empty: derived from `rank` by BalancedCoordinates.
  std::vector<int> initial_coordinates;
  int64_t rank = 0;
};

// Tracks one peer's position in the grid. Not thread-safe (one per averager; the averager
// serialises rounds).
class GroupKeyManager {
 public:
  static Result<GroupKeyManager> Create(GroupKeyOptions options);

  // Coordinates that put exactly grid_side peers in each cell when ranks 0..M^d-1 are used, and
  // spread any other set of consecutive ranks as evenly as possible: the base-M digits of
  // rank mod M^(d-1).
  static std::vector<int> BalancedCoordinates(int64_t rank, int grid_side, int grid_dims);

  const std::string& CurrentKey() const { return key_; }
  const std::vector<int>& coordinates() const { return coordinates_; }
  const GroupKeyOptions& options() const { return options_; }

  // The Moshpit step, after a group of `group_size` assembled with id `group_id` and this peer at
  // `my_index`: drop the oldest coordinate, append the one NextCoordinates assigns to my_index.
  // Peers that shared a key now hold distinct keys, so the next round mixes along another
  // dimension. A flat grid has nothing to update.
  Status OnGroupAssembled(const std::string& group_id, int my_index, int group_size);

  // A round that found no group leaves the key as it is: moving alone would only make the next
  // match less likely (hivemind does the same).
  void OnGroupFailed() {}

 private:
  explicit GroupKeyManager(GroupKeyOptions options);
  void Rebuild();

  GroupKeyOptions options_;
  std::vector<int> coordinates_;
  std::string key_;
};

}  // namespace hivemind::averaging
