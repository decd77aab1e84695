#include "averaging/reduce_kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace hivemind::averaging {

namespace {

constexpr uint32_t kExponent = 0x7f800000u;  // all ones: inf or NaN
constexpr size_t kBlock = 2048;              // elements per block: stays in L1

uint32_t LoadBits(const uint8_t* at) {
  uint32_t bits;
  std::memcpy(&bits, at, sizeof(bits));
  return bits;
}

// Branch-free, so the compiler vectorizes it; the caller checks the result once per block.
uint32_t CountNonFinite(const uint8_t* bytes, size_t count) {
  uint32_t bad = 0;
  for (size_t i = 0; i < count; ++i) {
    bad += static_cast<uint32_t>((LoadBits(bytes + i * sizeof(float)) & kExponent) == kExponent);
  }
  return bad;
}

}  // namespace

bool AllFinite(const void* data, size_t count) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  for (size_t begin = 0; begin < count; begin += kBlock) {
    if (CountNonFinite(bytes + begin * sizeof(float), std::min(kBlock, count - begin)) != 0) {
      return false;
    }
  }
  return true;
}

void WeightedMean(const float* const* inputs, const double* weights, size_t num_inputs,
                  size_t count, float* out) {
  double total = 0;
  for (size_t k = 0; k < num_inputs; ++k) total += weights[k];
  if (num_inputs == 0 || total <= 0) {
    std::fill(out, out + count, 0.0f);
    return;
  }
  double sum[kBlock];
  for (size_t begin = 0; begin < count; begin += kBlock) {
    const size_t n = std::min(kBlock, count - begin);
    double* __restrict acc = sum;
    const float* __restrict first = inputs[0] + begin;
    const double w0 = weights[0];
    for (size_t i = 0; i < n; ++i) acc[i] = w0 * static_cast<double>(first[i]);
    for (size_t k = 1; k < num_inputs; ++k) {
      const float* __restrict x = inputs[k] + begin;
      const double w = weights[k];
      for (size_t i = 0; i < n; ++i) acc[i] += w * static_cast<double>(x[i]);
    }
    float* __restrict result = out + begin;
    for (size_t i = 0; i < n; ++i) result[i] = static_cast<float>(acc[i] / total);
  }
}

bool CopyFinite(const float* in, size_t count, float* out) {
  uint32_t bad = 0;
  for (size_t begin = 0; begin < count; begin += kBlock) {
    const size_t n = std::min(kBlock, count - begin);
    std::memcpy(out + begin, in + begin, n * sizeof(float));
    bad += CountNonFinite(reinterpret_cast<const uint8_t*>(out + begin), n);  // still in L1
  }
  return bad == 0;
}

}  // namespace hivemind::averaging
