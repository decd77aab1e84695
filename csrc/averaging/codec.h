#pragma once

// Tensor compression codecs for averaging and state transfer.
//
// A tensor (or a slice of one, an all-reduce "part") is encoded into a self-describing byte string:
// a 24-byte header naming the codec, the source dtype, the element count and the block size,
// followed by the codec's scales or code table and then the element codes. Receivers decode it
// into a buffer of the original dtype (Decode) or into a float32 accumulation buffer
// (DecodeToFloat32). Every byte of an encoded tensor comes from a peer, so decoding validates the
// header, the exact length, every scale and every code table before reading anything else, and
// rejects non-finite results; see docs/compression.md for the formats and error envelopes.
//
// This layer is torch-free: a tensor is raw little-endian bytes plus an element count and a dtype.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/status.h"

namespace hivemind::averaging {

// Element types a tensor may have. The values are part of the encoded header; never renumber.
enum class DType : uint8_t {
  kFloat32 = 1,
  kFloat64 = 2,
  kFloat16 = 3,
  kBFloat16 = 4,
};

// Bytes per element, or 0 for a value that is not a DType.
size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);

// The codecs. The values follow hivemind's CompressionType numbering so that logs and options read
// the same to hivemind users; the encoded formats themselves are our own and not interchangeable.
enum class CodecId : uint8_t {
  kNone = 0,           // the raw bytes of the source dtype, lossless
  kScaledFloat16 = 1,  // per block: fp16 of (x - mean) / std, plus float32 mean and std
  kFloat16 = 2,        // IEEE half precision, finite values beyond +-65504 saturate
  kQuantile8 = 3,      // 256-entry code table fitted to the tensor's distribution, uint8 codes
  kUniform8 = 4,       // 256 evenly spaced levels from the tensor's min to its max, uint8 codes
  kBlockwise8 = 5,     // per block: absmax scale and uint8 codes into a dynamic (log-like) code map
};

const char* CodecName(CodecId codec);

// Block sizes the blocked codecs (kScaledFloat16, kBlockwise8) accept. The default follows the
// blockwise 8-bit paper's choice for tensors exchanged between peers (hivemind also uses 4096).
constexpr uint32_t kDefaultBlockSize = 4096;
constexpr uint32_t kMaxBlockSize = uint32_t{1} << 24;
// Largest element count an encoded tensor may declare: keeps every size computation far from
// overflow (2^48 elements of 8 bytes is 2 PiB, beyond any single tensor part).
constexpr uint64_t kMaxEncodedElements = uint64_t{1} << 48;
constexpr size_t kEncodedHeaderBytes = 24;

// Which codec to use and how. block_size is only meaningful for the blocked codecs; 0 there means
// kDefaultBlockSize, and other codecs require it to be 0.
struct CodecSpec {
  CodecId id = CodecId::kNone;
  uint32_t block_size = 0;

  static CodecSpec None() { return {CodecId::kNone, 0}; }
  static CodecSpec Float16() { return {CodecId::kFloat16, 0}; }
  static CodecSpec ScaledFloat16(uint32_t block_size = kDefaultBlockSize) {
    return {CodecId::kScaledFloat16, block_size};
  }
  static CodecSpec Uniform8() { return {CodecId::kUniform8, 0}; }
  static CodecSpec Quantile8() { return {CodecId::kQuantile8, 0}; }
  static CodecSpec Blockwise8(uint32_t block_size = kDefaultBlockSize) {
    return {CodecId::kBlockwise8, block_size};
  }

  bool operator==(const CodecSpec& other) const {
    return id == other.id && block_size == other.block_size;
  }
  bool operator!=(const CodecSpec& other) const { return !(*this == other); }
};

// Read-only tensor bytes: num_elements elements of dtype, little-endian, no alignment required.
struct TensorView {
  const void* data = nullptr;
  uint64_t num_elements = 0;
  DType dtype = DType::kFloat32;
};

// Writable tensor bytes, same conventions.
struct MutableTensorView {
  void* data = nullptr;
  uint64_t num_elements = 0;
  DType dtype = DType::kFloat32;
};

struct EncodeOptions {
  // Lets kNone and kFloat16 carry inf and NaN (for state transfer of tensors that legitimately hold
  // them). Every other codec cannot represent them and refuses them regardless.
  bool allow_non_finite = false;
};

struct DecodeOptions {
  // Accept decoded inf/NaN. Off by default: a peer sending non-finite values in a tensor part is
  // treated as sending a malformed part (kProtocolError).
  bool allow_non_finite = false;
};

// What an encoded header declares, after validation against the byte length.
struct EncodedInfo {
  CodecId codec = CodecId::kNone;
  DType dtype = DType::kFloat32;
  uint64_t num_elements = 0;
  uint32_t block_size = 0;
};

// Checks a spec: a known codec and a block size the codec accepts. kInvalidArgument otherwise.
Status ValidateSpec(const CodecSpec& spec);

// Exact size of the encoding of num_elements elements of dtype (all formats are fixed-size given
// these). kInvalidArgument for a bad spec or dtype, or more than kMaxEncodedElements.
Result<size_t> EncodedSize(const CodecSpec& spec, uint64_t num_elements, DType dtype);

// Encodes input into out[0, EncodedSize) and returns the bytes written. kInvalidArgument for a bad
// spec, a bad view, capacity below EncodedSize, or values the codec refuses (non-finite values;
// float64 values beyond the float32 range for the lossy codecs, which compute in float32).
Result<size_t> EncodeTo(const CodecSpec& spec, const TensorView& input, void* out, size_t capacity,
                        const EncodeOptions& options = {});

// Same, into a new buffer.
Result<std::vector<uint8_t>> Encode(const CodecSpec& spec, const TensorView& input,
                                    const EncodeOptions& options = {});

// Parses and validates the header and the total length of an encoded tensor, and every scale and
// code table in it. kProtocolError on anything malformed.
Result<EncodedInfo> InspectEncoded(const void* data, size_t size);

// Decodes into out, which must have the encoded dtype and element count (kProtocolError if the
// bytes declare something else: the sender disagrees with the receiver's schema; kInvalidArgument
// for a null buffer). Nothing is promised about out's contents after an error.
Status Decode(const void* data, size_t size, const MutableTensorView& out,
              const DecodeOptions& options = {});

// Decodes into float32, whatever the source dtype (float64 values are rounded to float32).
Status DecodeToFloat32(const void* data, size_t size, float* out, uint64_t num_elements,
                       const DecodeOptions& options = {});

}  // namespace hivemind::averaging
