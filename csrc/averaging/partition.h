// How a flat vector is split among the reducers of a group (load balancing) and cut into parts
// (pipelining). Every member computes the same Partition from the same Group, so no negotiation
// is needed.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "averaging/group.h"
#include "common/status.h"

namespace hivemind::averaging {

// 256 Ki float32 elements = 1 MiB per part: small enough to pipeline, big enough that
// per-message overhead is negligible. Twice hivemind's DEFAULT_PART_SIZE_BYTES: 5-8 % faster
// rounds of 16-64 MiB on loopback than 512 KiB parts (docs/benchmarks.md), and no slower at 4 MiB.
constexpr size_t kDefaultPartElements = size_t{256} << 10;

// Splits `total` into integers proportional to `weights` (largest remainder method; ties go to the
// lower index). Weights must be finite and >= 0 with a positive sum. Deterministic: the same
// inputs give the same split on every machine with IEEE doubles.
std::vector<size_t> SplitProportionally(size_t total, const std::vector<double>& weights);

struct Part {
  size_t begin = 0;  // element offset in the flat vector
  size_t size = 0;   // elements, 1..part_elements
  int share = 0;     // member index of the share's original reducer
};

class Partition {
 public:
  // Shares sized by BalancedShareFractions (load_balance.h: the split that ends the round first
  // given the members' bandwidths; 0 for members that cannot reduce); each share cut into parts
  // of at most `part_elements`.
  static Result<Partition> Make(const Group& group, size_t total_elements,
                                size_t part_elements = kDefaultPartElements);

  size_t total_elements() const { return total_; }
  size_t part_elements() const { return part_elements_; }
  size_t num_members() const { return share_begin_.size(); }
  // Share of member m: elements [share_begin(m), share_begin(m) + share_size(m)).
  size_t share_begin(int member) const { return share_begin_[member]; }
  size_t share_size(int member) const { return share_size_[member]; }
  // Parts of member m's share: indices [first_part(m), first_part(m) + num_parts(m)) of parts().
  size_t first_part(int member) const { return first_part_[member]; }
  size_t num_parts(int member) const { return num_parts_[member]; }
  const std::vector<Part>& parts() const { return parts_; }
  // Fingerprint of the split (total, part size, share sizes). Members compare it before a round:
  // fractions are floating point, and a build that rounds differently (another compiler's fused
  // multiply-add) must be refused, not mix up shares.
  std::string Digest() const;

 private:
  size_t total_ = 0;
  size_t part_elements_ = 0;
  std::vector<size_t> share_begin_, share_size_, first_part_, num_parts_;
  std::vector<Part> parts_;
};

}  // namespace hivemind::averaging
