// kBlockwise8: per block of B elements (default 4096), the block's absmax as a float32 scale and,
// per element, the index of the code-map entry nearest to x / absmax. Each block adapts to its own
// magnitude, so an outlier only costs precision within its block, and the log-like code map keeps
// small values of a block alive. Zeros (and all-zero blocks) decode exactly to zero.
//   payload: float32 code_map[256] | float32 absmax[nb] | uint8 code[n]     nb = ceil(n / B)
//   value = code_map[code] * absmax[block]
// The map travels with the tensor (1 KiB) so that a receiver needs no agreement on it beyond the
// format version, and other maps (e.g. an unsigned one for second moments) need no new codec id.

#include "averaging/codec_blockwise8.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>
#include <vector>

#include "averaging/codec_bucketize.h"
#include "averaging/codec_internal.h"

namespace hivemind::averaging {
namespace {

std::array<float, 256> BuildSignedDynamicCodeMap() {
  std::vector<double> values;
  values.reserve(256);
  for (int decade = 0; decade <= 6; ++decade) {
    // 2^decade intervals evenly splitting [0.1, 1], represented by their midpoints, scaled into
    // [10^(decade-7), 10^(decade-6)].
    const int count = 1 << decade;
    const double scale = std::pow(10.0, decade - 6);
    for (int k = 0; k < count; ++k) {
      const double low = 0.1 + 0.9 * k / count;
      const double high = 0.1 + 0.9 * (k + 1) / count;
      const double value = scale * (low + high) / 2;
      values.push_back(value);
      values.push_back(-value);
    }
  }
  values.push_back(0.0);
  values.push_back(1.0);
  std::sort(values.begin(), values.end());
  std::array<float, 256> map{};
  for (size_t i = 0; i < map.size(); ++i) map[i] = static_cast<float>(values[i]);
  return map;
}

// Midpoints between consecutive codes: the nearest-code thresholds.
std::array<float, 255> Midpoints(const std::array<float, 256>& map) {
  std::array<float, 255> mid{};
  for (size_t i = 0; i < mid.size(); ++i) mid[i] = (map[i] + map[i + 1]) / 2;
  return mid;
}

const Bucketizer& DynamicMapBucketizer() {
  static const Bucketizer bucketizer(Midpoints(SignedDynamicCodeMap()).data());
  return bucketizer;
}

}  // namespace

const std::array<float, 256>& SignedDynamicCodeMap() {
  static const std::array<float, 256> map = BuildSignedDynamicCodeMap();
  return map;
}

namespace internal {
namespace {

size_t Blockwise8PayloadSize(uint64_t num_elements, DType /*dtype*/, uint32_t block_size) {
  return static_cast<size_t>(kCodeTableSize * 4 + CeilDiv(num_elements, block_size) * 4 +
                             num_elements);
}

float AbsMax(const float* values, size_t count) {
  // Lane-parallel for the same reason as the uniform codec's min/max.
  constexpr size_t kLanes = 8;
  float lane[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) {
      const float a = std::fabs(values[i + j]);
      lane[j] = a > lane[j] ? a : lane[j];
    }
  }
  for (; i < count; ++i) lane[0] = std::max(lane[0], std::fabs(values[i]));
  float result = 0;
  for (size_t j = 0; j < kLanes; ++j) result = std::max(result, lane[j]);
  return result;
}

Status Blockwise8Encode(const TensorView& input, uint32_t block_size,
                        const EncodeOptions& /*options*/, uint8_t* payload) {
  const uint64_t n = input.num_elements;
  const uint64_t blocks = CeilDiv(n, block_size);
  const std::array<float, 256>& map = SignedDynamicCodeMap();
  const Bucketizer& bucketizer = DynamicMapBucketizer();
  for (size_t i = 0; i < map.size(); ++i) WriteFloat(payload + 4 * i, map[i]);
  uint8_t* scales = payload + kCodeTableSize * 4;
  uint8_t* codes = scales + blocks * 4;
  std::vector<float> block(static_cast<size_t>(std::min<uint64_t>(block_size, n)));
  for (uint64_t b = 0; b < blocks; ++b) {
    const uint64_t first = b * block_size;
    const size_t count = static_cast<size_t>(std::min<uint64_t>(block_size, n - first));
    for (size_t offset = 0; offset < count; offset += kChunkElements) {
      const size_t part = std::min(kChunkElements, count - offset);
      Status status =
          LoadFiniteChunk(input, first + offset, part, CodecId::kBlockwise8, block.data() + offset);
      if (!status.ok()) return status;
    }
    const float absmax = AbsMax(block.data(), count);
    WriteFloat(scales + b * 4, absmax);
    uint8_t* out = codes + first;
    if (absmax >= FLT_MIN) {
      const float inverse = 1.0f / absmax;
      for (size_t i = 0; i < count; ++i) {
        out[i] = static_cast<uint8_t>(bucketizer.Index(block[i] * inverse));
      }
    } else {
      // Zero or denormal absmax: 1/absmax would overflow; divide instead (0/0 cannot happen for
      // a zero block because its values are all zero and absmax 0 takes the branch below).
      for (size_t i = 0; i < count; ++i) {
        out[i] = static_cast<uint8_t>(bucketizer.Index(absmax > 0 ? block[i] / absmax : 0.0f));
      }
    }
  }
  return Status::Ok();
}

Status Blockwise8Validate(const EncodedInfo& info, const uint8_t* payload) {
  float previous = -FLT_MAX;
  for (size_t i = 0; i < kCodeTableSize; ++i) {
    const float code = ReadFloat(payload + 4 * i);
    if (!IsFinite(code) || code < -1.0f || code > 1.0f || (i > 0 && !(code > previous))) {
      return Status(
          StatusCode::kProtocolError,
          "encoded tensor: blockwise-8bit code map entry " + std::to_string(i) +
              " is invalid (the map must be finite, strictly increasing, within [-1, 1])");
    }
    previous = code;
  }
  const uint64_t blocks = CeilDiv(info.num_elements, info.block_size);
  const uint8_t* scales = payload + kCodeTableSize * 4;
  for (uint64_t b = 0; b < blocks; ++b) {
    const float absmax = ReadFloat(scales + b * 4);
    if (!IsFinite(absmax) || absmax < 0) {
      return Status(StatusCode::kProtocolError,
                    "encoded tensor: blockwise-8bit block " + std::to_string(b) +
                        " has an invalid absmax (it must be finite and >= 0)");
    }
  }
  return Status::Ok();
}

void Blockwise8DecodeRange(const EncodedInfo& info, const uint8_t* payload, uint64_t first,
                           size_t count, float* out) {
  const uint64_t blocks = CeilDiv(info.num_elements, info.block_size);
  float map[kCodeTableSize];
  std::memcpy(map, payload, sizeof(map));
  const uint8_t* scales = payload + kCodeTableSize * 4;
  const uint8_t* codes = scales + blocks * 4;
  size_t done = 0;
  while (done < count) {
    const uint64_t index = first + done;
    const uint64_t b = index / info.block_size;
    const size_t run =
        static_cast<size_t>(std::min<uint64_t>(count - done, (b + 1) * info.block_size - index));
    const float absmax = ReadFloat(scales + b * 4);
    MapGrouped<uint8_t, float>(codes + index, out + done, run,
                               [&](uint8_t q) { return map[q] * absmax; });
    done += run;
  }
}

}  // namespace

const CodecOps& Blockwise8Ops() {
  static const CodecOps ops{Blockwise8PayloadSize, Blockwise8Encode, Blockwise8Validate,
                            Blockwise8DecodeRange};
  return ops;
}

}  // namespace internal
}  // namespace hivemind::averaging
