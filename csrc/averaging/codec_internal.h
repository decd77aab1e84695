#pragma once

// Shared plumbing of the codec implementations (not part of the public interface): the per-codec
// operation table the dispatcher in codec.cpp calls, and little-endian field access.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "averaging/codec.h"

namespace hivemind::averaging::internal {

// Elements processed per step by the chunked loops: 16 KiB of float32 stays in L1 while it is
// converted, checked and quantized, so the extra passes cost little next to memory traffic.
constexpr size_t kChunkElements = 4096;

// dst[i] = fn(src[i]) for count elements, src and dst being unaligned little-endian arrays of In
// and Out (they may be the same buffer). Works in groups of kVectorGroup copied through local
// arrays, then a scalar remainder: GCC's -O2 vectorizer (the "very cheap" cost model) accepts no
// runtime alias checks and no epilogue loops, which a constant trip count over non-aliasing local
// arrays avoids; written as one plain loop the same conversion stays scalar at -O2. fn must be
// branch-free (see Select in codec_convert.h) for the group loop to vectorize.
constexpr size_t kVectorGroup = 16;

template <class In, class Out, class Fn>
inline void MapGrouped(const void* src, void* dst, size_t count, Fn&& fn) {
  const auto* in_bytes = static_cast<const uint8_t*>(src);
  auto* out_bytes = static_cast<uint8_t*>(dst);
  size_t i = 0;
  for (; i + kVectorGroup <= count; i += kVectorGroup) {
    In in[kVectorGroup];
    Out out[kVectorGroup];
    std::memcpy(in, in_bytes + i * sizeof(In), sizeof(in));
    for (size_t j = 0; j < kVectorGroup; ++j) out[j] = fn(in[j]);
    std::memcpy(out_bytes + i * sizeof(Out), out, sizeof(out));
  }
  for (; i < count; ++i) {
    In in;
    std::memcpy(&in, in_bytes + i * sizeof(In), sizeof(In));
    const Out out = fn(in);
    std::memcpy(out_bytes + i * sizeof(Out), &out, sizeof(Out));
  }
}

// Number of entries in every 8-bit code table.
constexpr size_t kCodeTableSize = 256;

inline uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

inline float ReadFloat(const uint8_t* p) {
  float value;
  std::memcpy(&value, p, sizeof(value));
  return value;
}

inline void WriteFloat(uint8_t* p, float value) { std::memcpy(p, &value, sizeof(value)); }

inline bool IsFinite(float value) {
  // Bit test instead of std::isfinite: stays correct under -ffast-math style flags.
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x7f800000u) != 0x7f800000u;
}

// One codec family. The dispatcher has already checked the spec, the view, the header and the
// exact payload length before calling any of these.
struct CodecOps {
  // Bytes after the header for num_elements elements (num_elements <= kMaxEncodedElements).
  size_t (*payload_size)(uint64_t num_elements, DType dtype, uint32_t block_size);
  // Writes exactly payload_size bytes. Refuses values the codec cannot represent with
  // kInvalidArgument naming the element.
  Status (*encode)(const TensorView& input, uint32_t block_size, const EncodeOptions& options,
                   uint8_t* payload);
  // Checks the payload's scales and code tables; kProtocolError naming the bad field.
  Status (*validate)(const EncodedInfo& info, const uint8_t* payload);
  // Decodes elements [first, first + count) as float32. Only called on validated payloads.
  void (*decode_range)(const EncodedInfo& info, const uint8_t* payload, uint64_t first,
                       size_t count, float* out);
};

const CodecOps& RawOps();
const CodecOps& Float16Ops();
const CodecOps& ScaledFloat16Ops();
const CodecOps& Uniform8Ops();
const CodecOps& Quantile8Ops();
const CodecOps& Blockwise8Ops();

// "element 12 is nan" / "element 3 is -inf" / "element 7 is out of the float32 range (1e+300)".
std::string DescribeBadElement(const TensorView& input, uint64_t index);

// kInvalidArgument for a non-finite input element, for codecs that can never carry one.
Status RefuseNonFinite(const TensorView& input, uint64_t index, CodecId codec);

// Loads input elements [first, first + count) as float32 and refuses any non-finite one (including
// float64 values that overflowed the float32 range).
Status LoadFiniteChunk(const TensorView& input, uint64_t first, size_t count, CodecId codec,
                       float* out);

}  // namespace hivemind::averaging::internal
