#include "averaging/load_balance.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

namespace hivemind::averaging {
namespace {

// A reducer's traffic per direction is fixed + slope * w (in units of the vector).
struct Reducer {
  int member;
  double bandwidth;
  double fixed;  // 1 when it contributes (its own vector goes out and comes back), else 0
  double slope;  // per unit of share: m - 2 for a contributor (its own piece stays home), m else
};

// Each member's bandwidth, an undeclared one replaced by the mean of those declared above 0 (1
// when there are none).
std::vector<double> Bandwidths(const Group& group) {
  double sum = 0;
  int declared = 0;
  for (const GroupMember& member : group.members) {
    if (member.bandwidth > 0) {
      sum += member.bandwidth;
      ++declared;
    }
  }
  const double assumed = declared > 0 ? sum / declared : 1.0;
  std::vector<double> bandwidths;
  for (const GroupMember& member : group.members) {
    bandwidths.push_back(member.bandwidth == kUndeclaredBandwidth ? assumed : member.bandwidth);
  }
  return bandwidths;
}

int Contributors(const Group& group) {
  return static_cast<int>(std::count_if(group.members.begin(), group.members.end(),
                                        [](const GroupMember& m) { return m.contributes(); }));
}

// Member i's fraction w_i must keep fixed_i + slope_i * w_i within time * b_i: the interval of
// fractions that allows, within [0, 1]. A member whose own vector alone takes longer (fixed_i >
// time * b_i) is not a reason to give up on `time`: the others are balanced as if it were not
// there, and it gets nothing to reduce (its own time is a floor no split can lower).
struct Interval {
  double low = 0, high = 1;
};
Interval Allowed(const Reducer& r, double time) {
  const double spare = time * r.bandwidth - r.fixed;
  Interval allowed;
  if (r.slope > 0) allowed.high = std::clamp(spare / r.slope, 0.0, 1.0);
  if (r.slope < 0) allowed.low = std::clamp(spare / r.slope, 0.0, 1.0);
  return allowed;
}

}  // namespace

std::vector<double> BalancedShareFractions(const Group& group) {
  const int m = Contributors(group);
  const std::vector<double> bandwidths = Bandwidths(group);
  std::vector<Reducer> reducers;
  for (size_t i = 0; i < group.members.size(); ++i) {
    const GroupMember& member = group.members[i];
    if (!member.can_reduce()) continue;
    const double fixed = member.contributes() ? 1.0 : 0.0;
    reducers.push_back(Reducer{static_cast<int>(i), bandwidths[i], fixed, m - 2.0 * fixed});
  }
  std::vector<double> fractions(group.members.size(), 0.0);
  if (reducers.empty()) return fractions;
  // The smallest time at which the allowed fractions can sum to 1, by bisection: the allowed
  // intervals only widen as time grows. Halving until the doubles stop moving: the same steps,
  // and so the same result, on every member.
  auto sums = [&](double time) {
    double low = 0, high = 0;
    for (const Reducer& r : reducers) {
      const Interval allowed = Allowed(r, time);
      low += allowed.low;
      high += allowed.high;
    }
    return std::make_pair(low, high);
  };
  double fits = 0;  // at this time a split fits
  for (const Reducer& r : reducers)
    fits = std::max(fits, (r.fixed + std::abs(r.slope)) / r.bandwidth);
  double too_short = 0;
  for (int step = 0; step < 200; ++step) {
    const double middle = too_short + (fits - too_short) / 2;
    if (middle <= too_short || middle >= fits) break;
    const auto [low, high] = sums(middle);
    if (low <= 1.0 && high >= 1.0) {
      fits = middle;
    } else {
      too_short = middle;
    }
  }
  // Where several splits are as fast (two contributors: a normal member's bytes do not depend on
  // its share), the slack is spread evenly over the allowed intervals.
  const auto [low, high] = sums(fits);
  const double spread = high > low ? std::clamp((1.0 - low) / (high - low), 0.0, 1.0) : 0.0;
  for (const Reducer& r : reducers) {
    const Interval allowed = Allowed(r, fits);
    fractions[r.member] = allowed.low + spread * (allowed.high - allowed.low);
  }
  return fractions;
}

double ModelRoundTime(const Group& group, const std::vector<size_t>& share_sizes, size_t total) {
  const int m = Contributors(group);
  const std::vector<double> bandwidths = Bandwidths(group);
  double slowest = 0;
  for (size_t i = 0; i < group.members.size(); ++i) {
    const GroupMember& member = group.members[i];
    if (!(bandwidths[i] > 0)) continue;
    const double w = total == 0 ? 0.0 : static_cast<double>(share_sizes[i]) / total;
    const double fixed = member.contributes() ? 1.0 : 0.0;
    const double bytes = fixed * (1.0 - w) + w * (m - fixed);
    slowest = std::max(slowest, bytes / bandwidths[i]);
  }
  return slowest;
}

}  // namespace hivemind::averaging
