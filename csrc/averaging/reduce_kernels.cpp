#include "averaging/reduce_kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

// Each kernel is compiled three times, for x86-64 (SSE2), x86-64-v3 (AVX2) and x86-64-v4
// (AVX-512), and the dynamic loader picks the best one the CPU runs (an ifunc): the baseline
// build leaves most of a vector unit idle. On this VM (AVX-512) the weighted mean of four 16 MiB
// inputs took 12 ms before, 7.5 ms cloned; a 16 MiB finiteness check 1.8 and 1.1 ms
// (docs/benchmarks.md). Built with -ffp-contract=off (CMakeLists.txt): no clone fuses a multiply
// and an add, so every CPU computes the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HIVEMIND_KERNEL \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HIVEMIND_KERNEL
#endif

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

HIVEMIND_KERNEL
bool AllFinite(const void* data, size_t count) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  for (size_t begin = 0; begin < count; begin += kBlock) {
    if (CountNonFinite(bytes + begin * sizeof(float), std::min(kBlock, count - begin)) != 0) {
      return false;
    }
  }
  return true;
}

HIVEMIND_KERNEL
bool WeightedMean(const float* const* inputs, const double* weights, size_t num_inputs,
                  size_t count, float* out) {
  double total = 0;
  for (size_t k = 0; k < num_inputs; ++k) total += weights[k];
  if (num_inputs == 0 || total <= 0) {
    std::fill(out, out + count, 0.0f);
    return true;
  }
  // Weights normalized once, so no division per element; the last input is added on the way
  // out, so two inputs (the commonest case) make one pass. Measured 1.5x on 32 MiB, n = 2.
  // The results are checked as they are stored, while they are in registers: that check stands
  // for one of every input (see the header), a pass over each received part fewer.
  const size_t last = num_inputs - 1;
  double sum[kBlock];
  uint32_t bad = 0;
  for (size_t begin = 0; begin < count; begin += kBlock) {
    const size_t n = std::min(kBlock, count - begin);
    double* __restrict acc = sum;
    auto* __restrict result = reinterpret_cast<uint8_t*>(out + begin);
    const float* __restrict x = inputs[last] + begin;
    const double w = weights[last] / total;
    auto store = [&](size_t i, double value) {
      const float rounded = static_cast<float>(value);
      uint32_t bits;
      std::memcpy(&bits, &rounded, sizeof(bits));
      std::memcpy(result + i * sizeof(float), &bits, sizeof(bits));
      bad += static_cast<uint32_t>((bits & kExponent) == kExponent);
    };
    if (last == 0) {
      for (size_t i = 0; i < n; ++i) store(i, w * static_cast<double>(x[i]));
      continue;
    }
    const float* __restrict first = inputs[0] + begin;
    const double w0 = weights[0] / total;
    for (size_t i = 0; i < n; ++i) acc[i] = w0 * static_cast<double>(first[i]);
    for (size_t k = 1; k < last; ++k) {
      const float* __restrict y = inputs[k] + begin;
      const double wk = weights[k] / total;
      for (size_t i = 0; i < n; ++i) acc[i] += wk * static_cast<double>(y[i]);
    }
    for (size_t i = 0; i < n; ++i) store(i, acc[i] + w * static_cast<double>(x[i]));
  }
  return bad == 0;
}

HIVEMIND_KERNEL
bool CopyFinite(const float* in, size_t count, float* out) {
  // One loop that loads, checks and stores each value: GCC vectorizes it, and it beats a memcpy
  // followed by a check of the copy (inlined as `rep movsq`, 25 % slower on 1 MiB parts).
  const auto* __restrict source = reinterpret_cast<const uint8_t*>(in);
  auto* __restrict target = reinterpret_cast<uint8_t*>(out);
  uint32_t bad = 0;
  for (size_t i = 0; i < count; ++i) {
    const uint32_t bits = LoadBits(source + i * sizeof(float));
    std::memcpy(target + i * sizeof(float), &bits, sizeof(bits));
    bad += static_cast<uint32_t>((bits & kExponent) == kExponent);
  }
  return bad == 0;
}

HIVEMIND_KERNEL
bool ScaledCopyFinite(const float* in, size_t count, float scale, float* out) {
  const auto* __restrict source = reinterpret_cast<const uint8_t*>(in);
  auto* __restrict target = reinterpret_cast<uint8_t*>(out);
  uint32_t bad = 0;
  for (size_t i = 0; i < count; ++i) {
    float value;
    std::memcpy(&value, source + i * sizeof(float), sizeof(value));
    value *= scale;
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    std::memcpy(target + i * sizeof(float), &bits, sizeof(bits));
    bad += static_cast<uint32_t>((bits & kExponent) == kExponent);
  }
  return bad == 0;
}

bool ScaledCopyFiniteStreaming(const float* in, size_t count, float scale, float* out) {
#if defined(__x86_64__)
  // Four floats at a time into 16-byte aligned pieces of `out` (SSE2: every x86-64 has it; the
  // copy is bound by memory, not by the vector width); the ends go through ScaledCopyFinite.
  const size_t misaligned = reinterpret_cast<uintptr_t>(out) % 16;
  size_t head = misaligned == 0 ? 0 : (16 - misaligned) / sizeof(float);
  if (misaligned % sizeof(float) != 0) head = count;  // not even float-aligned: no pieces
  head = std::min(head, count);
  bool finite = ScaledCopyFinite(in, head, scale, out);
  const size_t pieces = (count - head) / 4;
  const __m128 factor = _mm_set1_ps(scale);
  const __m128i exponent = _mm_set1_epi32(static_cast<int>(kExponent));
  __m128i bad = _mm_setzero_si128();
  for (size_t i = 0; i < pieces; ++i) {
    const size_t at = head + 4 * i;
    const __m128 value = _mm_mul_ps(_mm_loadu_ps(in + at), factor);
    const __m128i bits = _mm_and_si128(_mm_castps_si128(value), exponent);
    bad = _mm_or_si128(bad, _mm_cmpeq_epi32(bits, exponent));
    _mm_stream_ps(out + at, value);
  }
  const size_t done = head + 4 * pieces;
  finite = ScaledCopyFinite(in + done, count - done, scale, out + done) && finite;
  _mm_sfence();  // non-temporal stores are not ordered with later ones otherwise
  return finite && _mm_movemask_epi8(bad) == 0;
#else
  return ScaledCopyFinite(in, count, scale, out);
#endif
}

void StreamingCopy(const void* in, size_t bytes, void* out) {
  const auto* source = static_cast<const uint8_t*>(in);
  auto* target = static_cast<uint8_t*>(out);
#if defined(__x86_64__)
  // Whole 16-byte pieces of the destination, aligned (SSE2, which every x86-64 has: the CPU's
  // write-combining buffers join them into whole lines); the ends go through memcpy.
  const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(target) % 16) % 16);
  std::memcpy(target, source, head);
  source += head;
  target += head;
  bytes -= head;
  const size_t pieces = bytes / 16;
  for (size_t i = 0; i < pieces; ++i) {
    const __m128i piece = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source + 16 * i));
    _mm_stream_si128(reinterpret_cast<__m128i*>(target + 16 * i), piece);
  }
  std::memcpy(target + 16 * pieces, source + 16 * pieces, bytes - 16 * pieces);
  _mm_sfence();  // non-temporal stores are not ordered with later ones otherwise
#else
  std::memcpy(target, source, bytes);
#endif
}

}  // namespace hivemind::averaging
