#pragma once

// Maps a float to its bucket among 255 sorted thresholds (256 buckets) in O(1): the 8-bit codecs'
// hot loop. A plain binary search costs 8 dependent loads per element; instead a 64 Ki-entry table
// indexed by the top 16 bits of the float (sign, exponent, 7 mantissa bits) gives the bucket of
// the low end of the value's bit range, and at most a few comparisons finish the job. For the
// blockwise code map no bit range holds more than one threshold, so one comparison always does.

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "averaging/codec_convert.h"

namespace hivemind::averaging {

class Bucketizer {
 public:
  static constexpr size_t kThresholds = 255;

  // thresholds must be sorted non-decreasing and finite.
  explicit Bucketizer(const float* thresholds);

  // Number of thresholds <= value, in [0, 255]: for thresholds that are midpoints between sorted
  // codes, the index of the nearest code (ties go to the larger code). Any finite value is fine;
  // NaN gets some valid index.
  uint32_t Index(float value) const {
    const uint32_t key = FloatBits(value) >> 16;
    uint32_t index = base_[key];
    if (single_step_) return index + (value >= thresholds_[index] ? 1u : 0u);
    while (value >= thresholds_[index]) ++index;
    return index;
  }

  // Largest number of thresholds inside one table entry's bit range (<= 1 means Index is
  // branch-free).
  size_t max_thresholds_per_entry() const { return max_per_entry_; }

 private:
  // Thresholds plus a +inf sentinel at [255], so that the comparisons never run past the end.
  std::array<float, kThresholds + 1> thresholds_;
  std::vector<uint8_t> base_;  // 65536 entries
  size_t max_per_entry_ = 0;
  bool single_step_ = false;
};

}  // namespace hivemind::averaging
