// The two 16-bit codecs.
//
// kFloat16: every element rounded to IEEE half (round to nearest even). Relative error <= 2^-11
// for magnitudes in [2^-14, 65504]; absolute error <= 2^-25 below that; finite magnitudes above
// 65504 saturate to +-65504. Halves the bytes of float32, quarters float64.
//
// kScaledFloat16: per block of B elements, z = (x - mean) / std in half precision, plus the block's
// float32 mean and std. Because |x - mean| <= sqrt(B) * std for any block, |z| <= sqrt(B) <= 4096
// and never reaches the half range limit: unlike kFloat16 this codec has no saturation, and its
// error scales with each block's spread instead of with 2^-24 absolute near zero.
//   payload: float32 mean[nb] | float32 std[nb] | uint16 half[n]      nb = ceil(n / B)

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>
#include <vector>

#include "averaging/codec_convert.h"
#include "averaging/codec_internal.h"

namespace hivemind::averaging::internal {
namespace {

// ---- kFloat16 ----

size_t Float16PayloadSize(uint64_t num_elements, DType /*dtype*/, uint32_t /*block_size*/) {
  return static_cast<size_t>(num_elements) * 2;
}

Status Float16Encode(const TensorView& input, uint32_t /*block_size*/, const EncodeOptions& options,
                     uint8_t* payload) {
  float chunk[kChunkElements];
  for (uint64_t first = 0; first < input.num_elements; first += kChunkElements) {
    const size_t count =
        static_cast<size_t>(std::min<uint64_t>(kChunkElements, input.num_elements - first));
    LoadAsFloat32(input.dtype, input.data, first, count, chunk);
    if (!options.allow_non_finite) {
      const size_t bad = FindNonFiniteFloat32(chunk, count);
      if (bad != count) return RefuseNonFinite(input, first + bad, CodecId::kFloat16);
    }
    MapGrouped<float, uint16_t>(chunk, payload + first * 2, count,
                                [](float x) { return FloatToHalf(x); });
  }
  return Status::Ok();
}

Status Float16Validate(const EncodedInfo& /*info*/, const uint8_t* /*payload*/) {
  return Status::Ok();  // any half is a value; finiteness is checked on decode
}

void Float16DecodeRange(const EncodedInfo& /*info*/, const uint8_t* payload, uint64_t first,
                        size_t count, float* out) {
  LoadAsFloat32(DType::kFloat16, payload, first, count, out);
}

// ---- kScaledFloat16 ----

// Sum of (x - center) or of (x - center)^2 in double, in independent lanes so that it vectorizes
// (a single accumulator is a serial dependency the compiler may not reorder).
template <bool kSquared>
double SumDouble(const float* values, size_t count, float center) {
  constexpr size_t kLanes = 8;
  double lane[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) {
      const double d = static_cast<double>(values[i + j]) - center;
      lane[j] += kSquared ? d * d : d;
    }
  }
  for (; i < count; ++i) {
    const double d = static_cast<double>(values[i]) - center;
    lane[0] += kSquared ? d * d : d;
  }
  double sum = 0;
  for (const double v : lane) sum += v;
  return sum;
}

size_t ScaledPayloadSize(uint64_t num_elements, DType /*dtype*/, uint32_t block_size) {
  const uint64_t blocks = CeilDiv(num_elements, block_size);
  return static_cast<size_t>(blocks * 8 + num_elements * 2);
}

Status ScaledEncode(const TensorView& input, uint32_t block_size, const EncodeOptions& /*options*/,
                    uint8_t* payload) {
  const uint64_t n = input.num_elements;
  const uint64_t blocks = CeilDiv(n, block_size);
  uint8_t* means = payload;
  uint8_t* stds = payload + blocks * 4;
  uint8_t* halves = payload + blocks * 8;
  std::vector<float> block(static_cast<size_t>(std::min<uint64_t>(block_size, n)));
  std::vector<uint16_t> codes(block.size());
  for (uint64_t b = 0; b < blocks; ++b) {
    const uint64_t first = b * block_size;
    const size_t count = static_cast<size_t>(std::min<uint64_t>(block_size, n - first));
    for (size_t offset = 0; offset < count; offset += kChunkElements) {
      const size_t part = std::min(kChunkElements, count - offset);
      Status status = LoadFiniteChunk(input, first + offset, part, CodecId::kScaledFloat16,
                                      block.data() + offset);
      if (!status.ok()) return status;
    }
    // Statistics in double so that large blocks with a large mean keep their small spread. The
    // spread is measured around the mean as stored (rounded to float32), which is what the
    // decoder adds back; that keeps the bound |x - mean| <= sqrt(B) * std exact.
    const float mean = static_cast<float>(SumDouble<false>(block.data(), count, 0.0f) /
                                          static_cast<double>(count));
    const double squares = SumDouble<true>(block.data(), count, mean);
    // A constant block has std 0; FLT_MIN keeps 1/std finite and decodes it exactly (z = 0).
    const float std_dev =
        std::max(static_cast<float>(std::sqrt(squares / static_cast<double>(count))), FLT_MIN);
    const float inverse = 1.0f / std_dev;
    MapGrouped<float, uint16_t>(block.data(), codes.data(), count,
                                [=](float x) { return FloatToHalf((x - mean) * inverse); });
    // x - mean overflows float32 only for blocks whose values span more than the float32 range.
    if (FindNonFinite(DType::kFloat16, codes.data(), count) != count) {
      return Status(StatusCode::kInvalidArgument, "scaled-fp16 refuses the input: block " +
                                                      std::to_string(b) +
                                                      " spans more than the float32 range");
    }
    WriteFloat(means + b * 4, mean);
    WriteFloat(stds + b * 4, std_dev);
    std::memcpy(halves + first * 2, codes.data(), count * 2);
  }
  return Status::Ok();
}

Status ScaledValidate(const EncodedInfo& info, const uint8_t* payload) {
  const uint64_t blocks = CeilDiv(info.num_elements, info.block_size);
  for (uint64_t b = 0; b < blocks; ++b) {
    const float mean = ReadFloat(payload + b * 4);
    const float std_dev = ReadFloat(payload + (blocks + b) * 4);
    if (!IsFinite(mean) || !IsFinite(std_dev) || !(std_dev > 0)) {
      return Status(StatusCode::kProtocolError,
                    "encoded tensor: scaled-fp16 block " + std::to_string(b) +
                        " has an invalid mean/std (they must be finite, std > 0)");
    }
  }
  return Status::Ok();
}

void ScaledDecodeRange(const EncodedInfo& info, const uint8_t* payload, uint64_t first,
                       size_t count, float* out) {
  const uint64_t blocks = CeilDiv(info.num_elements, info.block_size);
  const uint8_t* halves = payload + blocks * 8;
  size_t done = 0;
  while (done < count) {
    const uint64_t index = first + done;
    const uint64_t b = index / info.block_size;
    const size_t run =
        static_cast<size_t>(std::min<uint64_t>(count - done, (b + 1) * info.block_size - index));
    const float mean = ReadFloat(payload + b * 4);
    const float std_dev = ReadFloat(payload + (blocks + b) * 4);
    MapGrouped<uint16_t, float>(halves + index * 2, out + done, run,
                                [=](uint16_t h) { return mean + HalfToFloat(h) * std_dev; });
    done += run;
  }
}

}  // namespace

const CodecOps& Float16Ops() {
  static const CodecOps ops{Float16PayloadSize, Float16Encode, Float16Validate, Float16DecodeRange};
  return ops;
}

const CodecOps& ScaledFloat16Ops() {
  static const CodecOps ops{ScaledPayloadSize, ScaledEncode, ScaledValidate, ScaledDecodeRange};
  return ops;
}

}  // namespace hivemind::averaging::internal
