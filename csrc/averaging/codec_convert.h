#pragma once

// Element conversions between the tensor dtypes and float32, written as branch-free bit
// manipulation so that the bulk loops vectorize at -O2 without F16C or other ISA extensions (the
// core is built for baseline x86-64 and for arm64).

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "averaging/codec.h"

namespace hivemind::averaging {

inline uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float BitsToFloat(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// cond ? a : b as mask arithmetic. GCC at -O2 keeps a ternary as a branch inside loops, and a
// branch stops the vectorizer ("control flow in loop"); masks do not.
inline uint32_t Select(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

// float32 -> IEEE binary16, round to nearest even. Finite values whose rounded magnitude exceeds
// 65504 become +-65504 (saturation: a large but finite gradient must not turn into inf on the
// wire); inf stays inf, NaN becomes a quiet NaN; the sign of zero is kept; magnitudes below 2^-25
// flush to zero.
inline uint16_t FloatToHalf(float value) {
  const uint32_t bits = FloatBits(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  // Normal halves: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to even.
  const uint32_t normal = (abs - 0x38000000u + 0x0fffu + ((abs >> 13) & 1u)) >> 13;
  // Subnormal halves (|value| < 2^-14): adding 0.5 aligns the value's bits so that the FPU's own
  // round-to-nearest-even drops exactly the bits a half subnormal cannot hold.
  const uint32_t subnormal = FloatBits(BitsToFloat(abs) + 0.5f) - 0x3f000000u;
  uint32_t half = Select(abs < 0x38800000u, subnormal, normal);
  // 0x477fefff is the largest float that rounds to 65504; anything finite above saturates.
  half = Select(abs > 0x477fefffu, 0x7bffu, half);
  half = Select(abs >= 0x7f800000u, 0x7c00u, half);
  half = Select(abs > 0x7f800000u, 0x7e00u, half);
  return static_cast<uint16_t>(sign | half);
}

// IEEE binary16 -> float32, exact for every half including subnormals, inf and NaN.
inline float HalfToFloat(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t abs = half & 0x7fffu;
  // Normal halves: rebias the exponent (15 -> 127).
  uint32_t bits = (abs << 13) + 0x38000000u;
  // Subnormal halves are mantissa * 2^-24, exactly representable as a normal float; computing it
  // with an int -> float conversion avoids denormal float arithmetic, which flush-to-zero modes
  // (torch.set_flush_denormal) would break.
  const uint32_t subnormal = FloatBits(static_cast<float>(static_cast<int32_t>(abs)) * 0x1p-24f);
  bits = Select(abs < 0x0400u, subnormal, bits);
  bits = Select(abs >= 0x7c00u, (abs << 13) | 0x7f800000u, bits);
  return BitsToFloat(sign | bits);
}

// float32 -> bfloat16, round to nearest even; finite values that would round up to inf saturate to
// the largest finite bfloat16, inf stays inf, NaN becomes a quiet NaN.
inline uint16_t FloatToBFloat16(float value) {
  const uint32_t bits = FloatBits(value);
  const uint32_t abs = bits & 0x7fffffffu;
  const uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  // 0x7f7f7fff is the largest float that still rounds to a finite bfloat16.
  rounded = Select(abs > 0x7f7f7fffu && abs < 0x7f800000u, sign | 0x7f7fu, rounded);
  rounded = Select(abs == 0x7f800000u, bits >> 16, rounded);
  rounded = Select(abs > 0x7f800000u, sign | 0x7fc0u, rounded);
  return static_cast<uint16_t>(rounded);
}

inline float BFloat16ToFloat(uint16_t value) {
  return BitsToFloat(static_cast<uint32_t>(value) << 16);
}

// Converts count elements of dtype starting at element `first` of src into float32. float64 values
// are rounded to nearest (beyond the float32 range they become inf, which the codecs then refuse).
void LoadAsFloat32(DType dtype, const void* src, uint64_t first, size_t count, float* dst);

// Converts count float32 values into dtype at element `first` of dst (saturating for the 16-bit
// dtypes, as above).
void StoreFromFloat32(DType dtype, const float* src, size_t count, void* dst, uint64_t first);

// Index of the first non-finite element among count elements of dtype at src, or count if all are
// finite. One vectorizable pass; the index is found only when a non-finite value exists.
size_t FindNonFinite(DType dtype, const void* src, size_t count);
size_t FindNonFiniteFloat32(const float* src, size_t count);

}  // namespace hivemind::averaging
