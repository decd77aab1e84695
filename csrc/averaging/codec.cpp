#include "averaging/codec.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "averaging/codec_convert.h"
#include "averaging/codec_internal.h"

namespace hivemind::averaging {

using internal::CodecOps;
using internal::kChunkElements;

// Encoded header, 24 bytes, every multi-byte field little-endian:
//   0  'h' 'c'        magic: a stray buffer of another kind fails here with a clear message
//   2  u8 version     kFormatVersion; a decoder refuses versions it does not know
//   3  u8 codec       CodecId
//   4  u8 dtype       DType of the source tensor (what Decode writes)
//   5  u8[3]         reserved, must be 0
//   8  u64 elements   element count, <= kMaxEncodedElements
//  16  u32 block      block size of the blocked codecs, 0 for the others
//  20  u32           reserved, must be 0
// Reserved fields must be zero so that a later version can give them a meaning without an old
// decoder silently misreading such a tensor.
namespace {

constexpr uint8_t kMagic0 = 'h';
constexpr uint8_t kMagic1 = 'c';
constexpr uint8_t kFormatVersion = 1;

void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutU64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t GetU32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
uint64_t GetU64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

bool IsKnownDType(uint8_t value) { return value >= 1 && value <= 4; }
bool IsKnownCodec(uint8_t value) { return value <= 5; }
bool IsBlocked(CodecId codec) {
  return codec == CodecId::kScaledFloat16 || codec == CodecId::kBlockwise8;
}

const CodecOps& OpsFor(CodecId codec) {
  switch (codec) {
    case CodecId::kNone:
      return internal::RawOps();
    case CodecId::kScaledFloat16:
      return internal::ScaledFloat16Ops();
    case CodecId::kFloat16:
      return internal::Float16Ops();
    case CodecId::kQuantile8:
      return internal::Quantile8Ops();
    case CodecId::kUniform8:
      return internal::Uniform8Ops();
    case CodecId::kBlockwise8:
      return internal::Blockwise8Ops();
  }
  return internal::RawOps();  // unreachable: callers check IsKnownCodec first
}

Status ProtocolError(const std::string& message) {
  return Status(StatusCode::kProtocolError, "encoded tensor: " + message);
}

Status InvalidArgument(const std::string& message) {
  return Status(StatusCode::kInvalidArgument, message);
}

std::string Str(uint64_t value) { return std::to_string(value); }

// Effective block size of a valid spec: the default filled in for blocked codecs.
uint32_t EffectiveBlockSize(const CodecSpec& spec) {
  if (!IsBlocked(spec.id)) return 0;
  return spec.block_size == 0 ? kDefaultBlockSize : spec.block_size;
}

// Validated header and payload of an encoded tensor.
struct Parsed {
  EncodedInfo info;
  const uint8_t* payload = nullptr;
};

Result<Parsed> Parse(const void* data, size_t size) {
  if (data == nullptr && size > 0) return InvalidArgument("encoded tensor: null data");
  if (size < kEncodedHeaderBytes) {
    return ProtocolError("truncated header (" + Str(size) + " bytes, need " +
                         Str(kEncodedHeaderBytes) + ")");
  }
  const auto* bytes = static_cast<const uint8_t*>(data);
  if (bytes[0] != kMagic0 || bytes[1] != kMagic1) return ProtocolError("bad magic");
  if (bytes[2] != kFormatVersion) {
    return ProtocolError("unsupported format version " + Str(bytes[2]) + " (this build reads " +
                         Str(kFormatVersion) + ")");
  }
  if (!IsKnownCodec(bytes[3])) return ProtocolError("unknown codec id " + Str(bytes[3]));
  if (!IsKnownDType(bytes[4])) return ProtocolError("unknown dtype " + Str(bytes[4]));
  if (bytes[5] != 0 || bytes[6] != 0 || bytes[7] != 0 || GetU32(bytes + 20) != 0) {
    return ProtocolError("reserved header fields are not zero");
  }
  Parsed parsed;
  parsed.info.codec = static_cast<CodecId>(bytes[3]);
  parsed.info.dtype = static_cast<DType>(bytes[4]);
  parsed.info.num_elements = GetU64(bytes + 8);
  parsed.info.block_size = GetU32(bytes + 16);
  const EncodedInfo& info = parsed.info;
  if (info.num_elements > kMaxEncodedElements) {
    return ProtocolError("element count " + Str(info.num_elements) + " exceeds the limit " +
                         Str(kMaxEncodedElements));
  }
  if (IsBlocked(info.codec)) {
    if (info.block_size == 0 || info.block_size > kMaxBlockSize) {
      return ProtocolError(std::string(CodecName(info.codec)) + " block size " +
                           Str(info.block_size) + " is outside [1, " + Str(kMaxBlockSize) + "]");
    }
  } else if (info.block_size != 0) {
    return ProtocolError(std::string(CodecName(info.codec)) + " has no blocks but declares " +
                         Str(info.block_size));
  }
  const CodecOps& ops = OpsFor(info.codec);
  const size_t expected =
      kEncodedHeaderBytes + ops.payload_size(info.num_elements, info.dtype, info.block_size);
  if (size != expected) {
    return ProtocolError(std::string(CodecName(info.codec)) + " of " + Str(info.num_elements) +
                         " " + DTypeName(info.dtype) + " elements must be " + Str(expected) +
                         " bytes, got " + Str(size) + (size < expected ? " (truncated)" : ""));
  }
  parsed.payload = bytes + kEncodedHeaderBytes;
  Status status = ops.validate(info, parsed.payload);
  if (!status.ok()) return status;
  return parsed;
}

// Only the raw and fp16 codecs can ever produce inf/NaN; for the others a non-finite decoded value
// means forged scales, so it is refused whatever the options say.
bool MayCarryNonFinite(CodecId codec) {
  return codec == CodecId::kNone || codec == CodecId::kFloat16;
}

Status NonFiniteOutput(const EncodedInfo& info, uint64_t index) {
  return ProtocolError(std::string(CodecName(info.codec)) +
                       " decodes to a non-finite value at element " + Str(index));
}

Status CheckOutputShape(const EncodedInfo& info, uint64_t num_elements) {
  if (info.num_elements != num_elements) {
    return ProtocolError("declares " + Str(info.num_elements) + " elements, the receiver expects " +
                         Str(num_elements));
  }
  return Status::Ok();
}

}  // namespace

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "invalid-dtype";
}

const char* CodecName(CodecId codec) {
  switch (codec) {
    case CodecId::kNone:
      return "none";
    case CodecId::kScaledFloat16:
      return "scaled-fp16";
    case CodecId::kFloat16:
      return "fp16";
    case CodecId::kQuantile8:
      return "quantile-8bit";
    case CodecId::kUniform8:
      return "uniform-8bit";
    case CodecId::kBlockwise8:
      return "blockwise-8bit";
  }
  return "invalid-codec";
}

Status ValidateSpec(const CodecSpec& spec) {
  if (!IsKnownCodec(static_cast<uint8_t>(spec.id))) {
    return InvalidArgument("unknown codec id " + Str(static_cast<uint8_t>(spec.id)));
  }
  if (IsBlocked(spec.id)) {
    if (spec.block_size > kMaxBlockSize) {
      return InvalidArgument(std::string(CodecName(spec.id)) + " block size " +
                             Str(spec.block_size) + " exceeds " + Str(kMaxBlockSize));
    }
  } else if (spec.block_size != 0) {
    return InvalidArgument(std::string(CodecName(spec.id)) + " takes no block size (got " +
                           Str(spec.block_size) + ")");
  }
  return Status::Ok();
}

Result<size_t> EncodedSize(const CodecSpec& spec, uint64_t num_elements, DType dtype) {
  Status status = ValidateSpec(spec);
  if (!status.ok()) return status;
  if (!IsKnownDType(static_cast<uint8_t>(dtype))) {
    return InvalidArgument("unknown dtype " + Str(static_cast<uint8_t>(dtype)));
  }
  if (num_elements > kMaxEncodedElements) {
    return InvalidArgument("element count " + Str(num_elements) + " exceeds the limit " +
                           Str(kMaxEncodedElements));
  }
  return kEncodedHeaderBytes +
         OpsFor(spec.id).payload_size(num_elements, dtype, EffectiveBlockSize(spec));
}

Result<size_t> EncodeTo(const CodecSpec& spec, const TensorView& input, void* out, size_t capacity,
                        const EncodeOptions& options) {
  Result<size_t> size = EncodedSize(spec, input.num_elements, input.dtype);
  if (!size.ok()) return size.status();
  if (input.data == nullptr && input.num_elements > 0) return InvalidArgument("null input data");
  if (out == nullptr || capacity < *size) {
    return InvalidArgument("output buffer of " + Str(out == nullptr ? 0 : capacity) +
                           " bytes, need " + Str(*size));
  }
  const uint32_t block_size = EffectiveBlockSize(spec);
  auto* bytes = static_cast<uint8_t*>(out);
  std::memset(bytes, 0, kEncodedHeaderBytes);
  bytes[0] = kMagic0;
  bytes[1] = kMagic1;
  bytes[2] = kFormatVersion;
  bytes[3] = static_cast<uint8_t>(spec.id);
  bytes[4] = static_cast<uint8_t>(input.dtype);
  PutU64(bytes + 8, input.num_elements);
  PutU32(bytes + 16, block_size);
  Status status = OpsFor(spec.id).encode(input, block_size, options, bytes + kEncodedHeaderBytes);
  if (!status.ok()) return status;
  return *size;
}

Result<std::vector<uint8_t>> Encode(const CodecSpec& spec, const TensorView& input,
                                    const EncodeOptions& options) {
  Result<size_t> size = EncodedSize(spec, input.num_elements, input.dtype);
  if (!size.ok()) return size.status();
  std::vector<uint8_t> out(*size);
  Result<size_t> written = EncodeTo(spec, input, out.data(), out.size(), options);
  if (!written.ok()) return written.status();
  return out;
}

Result<EncodedInfo> InspectEncoded(const void* data, size_t size) {
  Result<Parsed> parsed = Parse(data, size);
  if (!parsed.ok()) return parsed.status();
  return parsed->info;
}

Status Decode(const void* data, size_t size, const MutableTensorView& out,
              const DecodeOptions& options) {
  Result<Parsed> parsed = Parse(data, size);
  if (!parsed.ok()) return parsed.status();
  const EncodedInfo& info = parsed->info;
  if (!IsKnownDType(static_cast<uint8_t>(out.dtype))) {
    return InvalidArgument("unknown output dtype " + Str(static_cast<uint8_t>(out.dtype)));
  }
  if (out.data == nullptr && out.num_elements > 0) return InvalidArgument("null output buffer");
  Status status = CheckOutputShape(info, out.num_elements);
  if (!status.ok()) return status;
  if (info.dtype != out.dtype) {
    return ProtocolError(std::string("carries ") + DTypeName(info.dtype) +
                         ", the receiver expects " + DTypeName(out.dtype));
  }
  const bool check_finite = !options.allow_non_finite || !MayCarryNonFinite(info.codec);
  // Lossless layouts: a copy, then a check in the source dtype.
  if (info.codec == CodecId::kNone ||
      (info.codec == CodecId::kFloat16 && out.dtype == DType::kFloat16)) {
    std::memcpy(out.data, parsed->payload, info.num_elements * DTypeSize(out.dtype));
    if (check_finite) {
      const size_t bad = FindNonFinite(out.dtype, out.data, info.num_elements);
      if (bad != info.num_elements) return NonFiniteOutput(info, bad);
    }
    return Status::Ok();
  }
  const CodecOps& ops = OpsFor(info.codec);
  float chunk[kChunkElements];
  for (uint64_t first = 0; first < info.num_elements; first += kChunkElements) {
    const size_t count =
        static_cast<size_t>(std::min<uint64_t>(kChunkElements, info.num_elements - first));
    ops.decode_range(info, parsed->payload, first, count, chunk);
    if (check_finite) {
      const size_t bad = FindNonFiniteFloat32(chunk, count);
      if (bad != count) return NonFiniteOutput(info, first + bad);
    }
    StoreFromFloat32(out.dtype, chunk, count, out.data, first);
  }
  return Status::Ok();
}

Status DecodeToFloat32(const void* data, size_t size, float* out, uint64_t num_elements,
                       const DecodeOptions& options) {
  Result<Parsed> parsed = Parse(data, size);
  if (!parsed.ok()) return parsed.status();
  const EncodedInfo& info = parsed->info;
  if (out == nullptr && num_elements > 0) return InvalidArgument("null output buffer");
  Status status = CheckOutputShape(info, num_elements);
  if (!status.ok()) return status;
  const bool check_finite = !options.allow_non_finite || !MayCarryNonFinite(info.codec);
  const CodecOps& ops = OpsFor(info.codec);
  // Check each chunk right after writing it, while it is still in L1.
  for (uint64_t first = 0; first < num_elements; first += kChunkElements) {
    const size_t count =
        static_cast<size_t>(std::min<uint64_t>(kChunkElements, num_elements - first));
    ops.decode_range(info, parsed->payload, first, count, out + first);
    if (check_finite) {
      const size_t bad = FindNonFiniteFloat32(out + first, count);
      if (bad != count) return NonFiniteOutput(info, first + bad);
    }
  }
  return Status::Ok();
}

namespace internal {

std::string DescribeBadElement(const TensorView& input, uint64_t index) {
  const auto* base = static_cast<const uint8_t*>(input.data);
  double value = 0;
  if (input.dtype == DType::kFloat64) {
    std::memcpy(&value, base + index * 8, 8);
  } else {
    float as_float;
    LoadAsFloat32(input.dtype, input.data, index, 1, &as_float);
    value = as_float;
  }
  char text[96];
  if (std::isfinite(value)) {
    std::snprintf(text, sizeof(text), "element %" PRIu64 " (%g) is out of the float32 range", index,
                  value);
  } else {
    std::snprintf(text, sizeof(text), "element %" PRIu64 " is %s", index,
                  std::isnan(value) ? "nan" : (value > 0 ? "inf" : "-inf"));
  }
  return text;
}

Status RefuseNonFinite(const TensorView& input, uint64_t index, CodecId codec) {
  const bool optional = MayCarryNonFinite(codec);
  return InvalidArgument(std::string(CodecName(codec)) +
                         " refuses the input: " + DescribeBadElement(input, index) +
                         (optional ? " (EncodeOptions::allow_non_finite lets it through)"
                                   : " (the codec cannot represent it)"));
}

Status LoadFiniteChunk(const TensorView& input, uint64_t first, size_t count, CodecId codec,
                       float* out) {
  LoadAsFloat32(input.dtype, input.data, first, count, out);
  const size_t bad = FindNonFiniteFloat32(out, count);
  if (bad != count) return RefuseNonFinite(input, first + bad, codec);
  return Status::Ok();
}

}  // namespace internal
}  // namespace hivemind::averaging
