// kNone: the tensor's own bytes. Lossless for every value, including NaN payloads, -0 and
// denormals; non-finite values are refused unless EncodeOptions::allow_non_finite is set.

#include <cstring>

#include "averaging/codec_convert.h"
#include "averaging/codec_internal.h"

namespace hivemind::averaging::internal {
namespace {

size_t RawPayloadSize(uint64_t num_elements, DType dtype, uint32_t /*block_size*/) {
  return static_cast<size_t>(num_elements) * DTypeSize(dtype);
}

Status RawEncode(const TensorView& input, uint32_t /*block_size*/, const EncodeOptions& options,
                 uint8_t* payload) {
  const size_t count = static_cast<size_t>(input.num_elements);
  if (!options.allow_non_finite) {
    const size_t bad = FindNonFinite(input.dtype, input.data, count);
    if (bad != count) return RefuseNonFinite(input, bad, CodecId::kNone);
  }
  if (count > 0) std::memcpy(payload, input.data, count * DTypeSize(input.dtype));
  return Status::Ok();
}

Status RawValidate(const EncodedInfo& /*info*/, const uint8_t* /*payload*/) {
  return Status::Ok();  // any bit pattern is an element; finiteness is checked on decode
}

void RawDecodeRange(const EncodedInfo& info, const uint8_t* payload, uint64_t first, size_t count,
                    float* out) {
  LoadAsFloat32(info.dtype, payload, first, count, out);
}

}  // namespace

const CodecOps& RawOps() {
  static const CodecOps ops{RawPayloadSize, RawEncode, RawValidate, RawDecodeRange};
  return ops;
}

}  // namespace hivemind::averaging::internal
