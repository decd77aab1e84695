// Which fraction of the vector each member of a group reduces, chosen so that the round ends as
// early as the members' declared bandwidths allow (DeDLOC's load balancing, as hivemind ships it).
//
// The traffic model: with m contributors, a member that contributes sends the (1 - w) of its
// vector that others reduce and receives as much back; a member that reduces a fraction w receives
// w from each other contributor and sends each of them the result. Per direction that is
//   normal member:    S * (1 + (m - 2) * w)
//   auxiliary member: S * m * w
//   client member:    S
// bytes, and the round lasts as long as the slowest member's bytes / bandwidth. The fractions
// minimize that maximum (a linear program, solved by bisection on the round time).
#pragma once

#include <cstddef>
#include <vector>

#include "averaging/group.h"

namespace hivemind::averaging {

// One fraction per member, summing to 1; 0 for members that cannot reduce (clients, bandwidth 0).
// A member with kUndeclaredBandwidth counts as the mean of the bandwidths declared above 0.
// A member too slow to matter (its own vector takes longer than the others' balanced round) gets
// nothing; where several splits are as fast (two contributors), the slack is spread evenly.
// Deterministic: every member computes the same fractions from the same group. The group must be
// valid (Group::Validate).
std::vector<double> BalancedShareFractions(const Group& group);

// The model's duration of a round over a vector of one unit with these share sizes (in elements,
// summing to `total`), in units of 1 / bandwidth: the slowest member's bytes over its bandwidth.
// Members with bandwidth 0 are left out (their links are unknown).
double ModelRoundTime(const Group& group, const std::vector<size_t>& share_sizes, size_t total);

}  // namespace hivemind::averaging
