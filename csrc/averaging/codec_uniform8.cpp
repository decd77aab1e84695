// kUniform8: 256 evenly spaced levels covering [min, max] of the tensor (part), so that no value is
// ever clipped and every element's error is at most step / 2 (step = (max - min) / 255) plus the
// float32 rounding of the result. Cheap and with a hard per-element bound, but a single outlier
// widens the step for everyone: kBlockwise8 is the robust choice for heavy-tailed data.
//   payload: float32 min | float32 step | uint8 code[n]        value = min + code * step

#include <algorithm>
#include <cfloat>
#include <string>

#include "averaging/codec_convert.h"
#include "averaging/codec_internal.h"

namespace hivemind::averaging::internal {
namespace {

size_t Uniform8PayloadSize(uint64_t num_elements, DType /*dtype*/, uint32_t /*block_size*/) {
  return static_cast<size_t>(8 + num_elements);
}

// Running min/max over a chunk, kept in 8 independent lanes so that the compiler turns the loop
// into packed min/max instead of a serial reduction (which it may not reorder for floats).
void UpdateMinMax(const float* values, size_t count, float* lo, float* hi) {
  constexpr size_t kLanes = 8;
  float lane_lo[kLanes];
  float lane_hi[kLanes];
  for (size_t j = 0; j < kLanes; ++j) {
    lane_lo[j] = *lo;
    lane_hi[j] = *hi;
  }
  size_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) {
      lane_lo[j] = values[i + j] < lane_lo[j] ? values[i + j] : lane_lo[j];
      lane_hi[j] = values[i + j] > lane_hi[j] ? values[i + j] : lane_hi[j];
    }
  }
  for (; i < count; ++i) {
    lane_lo[0] = std::min(lane_lo[0], values[i]);
    lane_hi[0] = std::max(lane_hi[0], values[i]);
  }
  for (size_t j = 0; j < kLanes; ++j) {
    *lo = std::min(*lo, lane_lo[j]);
    *hi = std::max(*hi, lane_hi[j]);
  }
}

Status Uniform8Encode(const TensorView& input, uint32_t /*block_size*/,
                      const EncodeOptions& /*options*/, uint8_t* payload) {
  const uint64_t n = input.num_elements;
  float chunk[kChunkElements];
  float lo = FLT_MAX;
  float hi = -FLT_MAX;
  for (uint64_t first = 0; first < n; first += kChunkElements) {
    const size_t count = static_cast<size_t>(std::min<uint64_t>(kChunkElements, n - first));
    Status status = LoadFiniteChunk(input, first, count, CodecId::kUniform8, chunk);
    if (!status.ok()) return status;
    UpdateMinMax(chunk, count, &lo, &hi);
  }
  if (n == 0) lo = hi = 0;
  const double range = static_cast<double>(hi) - lo;
  // Keeps x - min and code * step finite in float32 arithmetic on both sides.
  if (range > FLT_MAX / 2) {
    return Status(StatusCode::kInvalidArgument,
                  "uniform-8bit refuses the input: its values span more than half the float32 "
                  "range (min " +
                      std::to_string(lo) + ", max " + std::to_string(hi) + ")");
  }
  float step = static_cast<float>(range / 255.0);
  // A step below FLT_MIN would make 1/step overflow; FLT_MIN still covers such a tiny range.
  if (range > 0 && step < FLT_MIN) step = FLT_MIN;
  const float inverse = step > 0 ? 1.0f / step : 0.0f;
  WriteFloat(payload, lo);
  WriteFloat(payload + 4, step);
  uint8_t* codes = payload + 8;
  for (uint64_t first = 0; first < n; first += kChunkElements) {
    const size_t count = static_cast<size_t>(std::min<uint64_t>(kChunkElements, n - first));
    LoadAsFloat32(input.dtype, input.data, first, count, chunk);  // already checked finite
    // x >= lo, so (x - lo) * inverse is in [0, 255 * (1 + a few ulp)]: the float -> int
    // conversion is always defined, and rounding can only overshoot to 256, which the integer
    // clamp catches (a float clamp would keep the loop scalar at -O2).
    MapGrouped<float, uint8_t>(chunk, codes + first, count, [=](float x) {
      const uint32_t q = static_cast<uint32_t>(static_cast<int32_t>((x - lo) * inverse + 0.5f));
      return static_cast<uint8_t>(Select(q > 255u, 255u, q));
    });
  }
  return Status::Ok();
}

Status Uniform8Validate(const EncodedInfo& /*info*/, const uint8_t* payload) {
  const float lo = ReadFloat(payload);
  const float step = ReadFloat(payload + 4);
  if (!IsFinite(lo) || !IsFinite(step) || !(step >= 0) || step > FLT_MAX / 255) {
    return Status(StatusCode::kProtocolError,
                  "encoded tensor: uniform-8bit has an invalid min/step (they must be finite, "
                  "0 <= step <= FLT_MAX / 255)");
  }
  return Status::Ok();
}

void Uniform8DecodeRange(const EncodedInfo& /*info*/, const uint8_t* payload, uint64_t first,
                         size_t count, float* out) {
  const float lo = ReadFloat(payload);
  const float step = ReadFloat(payload + 4);
  MapGrouped<uint8_t, float>(payload + 8 + first, out, count,
                             [=](uint8_t q) { return lo + static_cast<float>(q) * step; });
}

}  // namespace

const CodecOps& Uniform8Ops() {
  static const CodecOps ops{Uniform8PayloadSize, Uniform8Encode, Uniform8Validate,
                            Uniform8DecodeRange};
  return ops;
}

}  // namespace hivemind::averaging::internal
