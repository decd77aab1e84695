#include "averaging/codec_convert.h"

#include "averaging/codec_internal.h"

namespace hivemind::averaging {
namespace {

using internal::MapGrouped;

// Unaligned little-endian element access: tensor bytes may come straight from a receive buffer at
// any offset, and memcpy of a fixed small size compiles to a plain load.
template <class T>
inline T LoadElement(const uint8_t* base, size_t index) {
  T value;
  std::memcpy(&value, base + index * sizeof(T), sizeof(T));
  return value;
}

}  // namespace

void LoadAsFloat32(DType dtype, const void* src, uint64_t first, size_t count, float* dst) {
  const uint8_t* base = static_cast<const uint8_t*>(src) + first * DTypeSize(dtype);
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, base, count * sizeof(float));
      return;
    case DType::kFloat64:
      MapGrouped<double, float>(base, dst, count, [](double v) { return static_cast<float>(v); });
      return;
    case DType::kFloat16:
      MapGrouped<uint16_t, float>(base, dst, count, [](uint16_t v) { return HalfToFloat(v); });
      return;
    case DType::kBFloat16:
      MapGrouped<uint16_t, float>(base, dst, count, [](uint16_t v) { return BFloat16ToFloat(v); });
      return;
  }
}

void StoreFromFloat32(DType dtype, const float* src, size_t count, void* dst, uint64_t first) {
  uint8_t* base = static_cast<uint8_t*>(dst) + first * DTypeSize(dtype);
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(base, src, count * sizeof(float));
      return;
    case DType::kFloat64:
      MapGrouped<float, double>(src, base, count, [](float v) { return static_cast<double>(v); });
      return;
    case DType::kFloat16:
      MapGrouped<float, uint16_t>(src, base, count, [](float v) { return FloatToHalf(v); });
      return;
    case DType::kBFloat16:
      MapGrouped<float, uint16_t>(src, base, count, [](float v) { return FloatToBFloat16(v); });
      return;
  }
}

namespace {

// A value is non-finite exactly when all its exponent bits are set. The scan ORs a per-element flag
// so that the loop has no early exit and vectorizes; the slow search runs only after a hit.
template <class Bits>
size_t FindExponentAllOnes(const uint8_t* base, size_t count, Bits exponent_mask) {
  // One flag per lane of a group, combined at the end: no cross-iteration dependency, so the
  // group loop vectorizes (see MapGrouped for why groups).
  constexpr size_t kGroup = internal::kVectorGroup;
  Bits lanes[kGroup] = {};
  size_t i = 0;
  for (; i + kGroup <= count; i += kGroup) {
    Bits group[kGroup];
    std::memcpy(group, base + i * sizeof(Bits), sizeof(group));
    for (size_t j = 0; j < kGroup; ++j) {
      lanes[j] |= static_cast<Bits>((group[j] & exponent_mask) == exponent_mask);
    }
  }
  for (; i < count; ++i) {
    lanes[0] |= static_cast<Bits>((LoadElement<Bits>(base, i) & exponent_mask) == exponent_mask);
  }
  Bits hit = 0;
  for (const Bits lane : lanes) hit |= lane;
  if (!hit) return count;
  for (size_t i = 0; i < count; ++i) {
    if ((LoadElement<Bits>(base, i) & exponent_mask) == exponent_mask) return i;
  }
  return count;
}

}  // namespace

size_t FindNonFinite(DType dtype, const void* src, size_t count) {
  const auto* base = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::kFloat32:
      return FindExponentAllOnes<uint32_t>(base, count, 0x7f800000u);
    case DType::kFloat64:
      return FindExponentAllOnes<uint64_t>(base, count, 0x7ff0000000000000ull);
    case DType::kFloat16:
      return FindExponentAllOnes<uint16_t>(base, count, 0x7c00u);
    case DType::kBFloat16:
      return FindExponentAllOnes<uint16_t>(base, count, 0x7f80u);
  }
  return count;
}

size_t FindNonFiniteFloat32(const float* src, size_t count) {
  return FindExponentAllOnes<uint32_t>(reinterpret_cast<const uint8_t*>(src), count, 0x7f800000u);
}

}  // namespace hivemind::averaging
