// kQuantile8: a 256-entry code table fitted to the tensor's own distribution, uint8 codes.
//
// Fitting (our own scheme): take a stratified sample of up to 65536 elements, start from
// equal-population buckets (the sample's 1/256 quantiles, which is what makes the table adapt to
// any distribution), then run Lloyd-Max iterations on the sorted sample (each code = mean of its
// bucket, each border = midpoint of neighbouring codes). Equal-population buckets alone waste
// precision on the tails (the outermost bucket of N(0,1) spans 2.66 .. inf); the refinement moves
// codes to where they reduce the squared error. Finally every element goes to the bucket its value
// falls in and each code becomes the exact mean of its bucket over the whole tensor.
//   payload: float32 code[256] (non-decreasing) | uint8 code_index[n]     value = code[index]

#include <algorithm>
#include <array>
#include <cfloat>
#include <string>
#include <vector>

#include "averaging/codec_bucketize.h"
#include "averaging/codec_convert.h"
#include "averaging/codec_internal.h"

namespace hivemind::averaging::internal {
namespace {

constexpr size_t kMaxSample = 65536;
// Lloyd converges slowly (a border moves about one bucket per iteration); 64 iterations on the
// sample cost ~1 ms and take N(0,1) from 3.2e-4 to 2.2e-4 MSE, within 20% of the fixed point.
constexpr int kLloydIterations = 64;
constexpr size_t kBorders = kCodeTableSize - 1;

size_t Quantile8PayloadSize(uint64_t num_elements, DType /*dtype*/, uint32_t /*block_size*/) {
  return static_cast<size_t>(kCodeTableSize * 4 + num_elements);
}

// splitmix64: a fixed, seedable mixer, so the same tensor always encodes to the same bytes.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Sorted sample: every element when there are few, else one pseudo-random element from each of
// kMaxSample equal strata (strided sampling alone would alias with row-periodic tensors).
Status SortedSample(const TensorView& input, std::vector<float>* sample) {
  const uint64_t n = input.num_elements;
  if (n <= kMaxSample) {
    sample->resize(static_cast<size_t>(n));
    for (uint64_t first = 0; first < n; first += kChunkElements) {
      const size_t count = static_cast<size_t>(std::min<uint64_t>(kChunkElements, n - first));
      Status status =
          LoadFiniteChunk(input, first, count, CodecId::kQuantile8, sample->data() + first);
      if (!status.ok()) return status;
    }
  } else {
    // The extremes always join the sample: Lloyd then isolates rare outliers in buckets of their
    // own instead of letting them drag a tail bucket's code away from its many ordinary values.
    float lo = FLT_MAX;
    float hi = -FLT_MAX;
    float chunk[kChunkElements];
    for (uint64_t first = 0; first < n; first += kChunkElements) {
      const size_t count = static_cast<size_t>(std::min<uint64_t>(kChunkElements, n - first));
      Status status = LoadFiniteChunk(input, first, count, CodecId::kQuantile8, chunk);
      if (!status.ok()) return status;
      for (size_t i = 0; i < count; ++i) {
        lo = std::min(lo, chunk[i]);
        hi = std::max(hi, chunk[i]);
      }
    }
    sample->resize(kMaxSample);
    for (size_t k = 0; k < kMaxSample; ++k) {
      const uint64_t begin = n * k / kMaxSample;
      const uint64_t end = n * (k + 1) / kMaxSample;
      const uint64_t index = begin + Mix(k) % (end - begin);
      LoadAsFloat32(input.dtype, input.data, index, 1, &(*sample)[k]);  // checked above
    }
    (*sample)[0] = lo;
    (*sample)[kMaxSample - 1] = hi;
  }
  std::sort(sample->begin(), sample->end());
  return Status::Ok();
}

// Borders of the 256 buckets (bucket j = [border[j-1], border[j])), fitted to the sorted sample.
std::array<float, kBorders> FitBorders(const std::vector<float>& sample) {
  const size_t s = sample.size();
  std::array<float, kBorders> border{};
  for (size_t j = 0; j < kBorders; ++j) border[j] = sample[(j + 1) * s / kCodeTableSize];
  std::vector<double> prefix(s + 1, 0.0);
  for (size_t i = 0; i < s; ++i) prefix[i + 1] = prefix[i] + sample[i];
  std::array<double, kCodeTableSize> centroid{};
  for (int iteration = 0; iteration < kLloydIterations; ++iteration) {
    size_t begin = 0;
    for (size_t j = 0; j < kCodeTableSize; ++j) {
      const size_t end =
          j < kBorders
              ? static_cast<size_t>(std::lower_bound(sample.begin(), sample.end(), border[j]) -
                                    sample.begin())
              : s;
      if (end > begin) {
        centroid[j] = (prefix[end] - prefix[begin]) / static_cast<double>(end - begin);
      } else {
        // Empty bucket (duplicated values): park its code on its lower border.
        centroid[j] = j == 0 ? border[0] : border[j - 1];
      }
      begin = std::max(begin, end);
    }
    for (size_t j = 0; j < kBorders; ++j) {
      border[j] = static_cast<float>((centroid[j] + centroid[j + 1]) / 2);
    }
    // Rounding to float32 must not break the order the bucketizer relies on.
    for (size_t j = 1; j < kBorders; ++j) border[j] = std::max(border[j], border[j - 1]);
  }
  return border;
}

Status Quantile8Encode(const TensorView& input, uint32_t /*block_size*/,
                       const EncodeOptions& /*options*/, uint8_t* payload) {
  const uint64_t n = input.num_elements;
  uint8_t* codes = payload + kCodeTableSize * 4;
  if (n == 0) {
    for (size_t j = 0; j < kCodeTableSize; ++j) WriteFloat(payload + 4 * j, 0.0f);
    return Status::Ok();
  }
  std::vector<float> sample;
  Status status = SortedSample(input, &sample);
  if (!status.ok()) return status;
  const std::array<float, kBorders> border = FitBorders(sample);
  const Bucketizer bucketizer(border.data());
  // Per-bucket sums in double: 2^48 float32 additions in float would lose the mean.
  std::array<double, kCodeTableSize> sum{};
  std::array<uint64_t, kCodeTableSize> count{};
  float chunk[kChunkElements];
  uint8_t indices[kChunkElements];
  for (uint64_t first = 0; first < n; first += kChunkElements) {
    const size_t part = static_cast<size_t>(std::min<uint64_t>(kChunkElements, n - first));
    status = LoadFiniteChunk(input, first, part, CodecId::kQuantile8, chunk);
    if (!status.ok()) return status;
    for (size_t i = 0; i < part; ++i) indices[i] = static_cast<uint8_t>(bucketizer.Index(chunk[i]));
    for (size_t i = 0; i < part; ++i) {
      sum[indices[i]] += chunk[i];
      ++count[indices[i]];
    }
    std::memcpy(codes + first, indices, part);
  }
  for (size_t j = 0; j < kCodeTableSize; ++j) {
    float code;
    if (count[j] > 0) {
      code = static_cast<float>(sum[j] / static_cast<double>(count[j]));
    } else {
      code = j == 0 ? border[0]
                    : (j == kBorders ? border[kBorders - 1] : (border[j - 1] + border[j]) / 2);
    }
    // Bucket j holds [border[j-1], border[j]); keeping its code there keeps the table sorted even
    // after the rounding of the mean.
    if (j > 0) code = std::max(code, border[j - 1]);
    if (j < kBorders) code = std::min(code, border[j]);
    WriteFloat(payload + 4 * j, code);
  }
  return Status::Ok();
}

Status Quantile8Validate(const EncodedInfo& /*info*/, const uint8_t* payload) {
  float previous = -FLT_MAX;
  for (size_t j = 0; j < kCodeTableSize; ++j) {
    const float code = ReadFloat(payload + 4 * j);
    if (!IsFinite(code) || code < previous) {
      return Status(StatusCode::kProtocolError,
                    "encoded tensor: quantile-8bit code table entry " + std::to_string(j) +
                        " is invalid (the table must be finite and non-decreasing)");
    }
    previous = code;
  }
  return Status::Ok();
}

void Quantile8DecodeRange(const EncodedInfo& /*info*/, const uint8_t* payload, uint64_t first,
                          size_t count, float* out) {
  float table[kCodeTableSize];
  std::memcpy(table, payload, sizeof(table));
  MapGrouped<uint8_t, float>(payload + kCodeTableSize * 4 + first, out, count,
                             [&](uint8_t q) { return table[q]; });
}

}  // namespace

const CodecOps& Quantile8Ops() {
  static const CodecOps ops{Quantile8PayloadSize, Quantile8Encode, Quantile8Validate,
                            Quantile8DecodeRange};
  return ops;
}

}  // namespace hivemind::averaging::internal
