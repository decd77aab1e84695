#include "averaging/codec_bucketize.h"

#include <algorithm>
#include <limits>

#include "averaging/codec_internal.h"

namespace hivemind::averaging {

Bucketizer::Bucketizer(const float* thresholds) : base_(size_t{1} << 16) {
  std::copy(thresholds, thresholds + kThresholds, thresholds_.begin());
  thresholds_[kThresholds] = std::numeric_limits<float>::infinity();
  // Walk the table entries in increasing value order (negative entries from the most negative,
  // then positive ones from +0) with two monotone cursors: `low` counts thresholds <= the smallest
  // value of the entry's range, `high` those <= its largest value.
  std::vector<uint32_t> order;
  order.reserve(size_t{1} << 16);
  for (uint32_t key = 0xffff; key >= 0x8000; --key) order.push_back(key);
  for (uint32_t key = 0; key < 0x8000; ++key) order.push_back(key);
  size_t low = 0;
  size_t high = 0;
  for (const uint32_t key : order) {
    const bool negative = key >= 0x8000;
    const float smallest = BitsToFloat(negative ? (key << 16) | 0xffffu : key << 16);
    const float largest = BitsToFloat(negative ? key << 16 : (key << 16) | 0xffffu);
    if (!internal::IsFinite(smallest) || !internal::IsFinite(largest)) {
      // inf/NaN ranges: Index is only promised something valid there.
      base_[key] = negative ? 0 : kThresholds;
      continue;
    }
    while (low < kThresholds && thresholds_[low] <= smallest) ++low;
    while (high < kThresholds && thresholds_[high] <= largest) ++high;
    base_[key] = static_cast<uint8_t>(low);
    max_per_entry_ = std::max(max_per_entry_, high - low);
  }
  single_step_ = max_per_entry_ <= 1;
}

}  // namespace hivemind::averaging
