#pragma once

// Which codec a tensor (part) is sent with: chosen per tensor from its size, its role and its
// dtype by a small policy object (the counterpart of hivemind's SizeAdaptiveCompression and
// RoleAdaptiveCompression, folded into one value that the backend's Options can carry).

#include <cstdint>

#include "averaging/codec.h"

namespace hivemind::averaging {

// What a tensor is, as far as compression cares.
enum class TensorRole : uint8_t {
  kUnspecified = 0,
  kGradient,
  kParameter,
  kOptimizerState,
  kActivation,
};

const char* TensorRoleName(TensorRole role);

struct CodecPolicy {
  // Tensors with fewer elements go uncompressed: the codecs' fixed overhead (1 KiB of code table
  // for the 8-bit ones) and their precision loss buy little bandwidth on small tensors such as
  // biases and norms, which are also the most sensitive to error.
  uint64_t min_compressed_elements = uint64_t{1} << 16;
  CodecSpec gradient = CodecSpec::None();
  CodecSpec parameter = CodecSpec::None();
  CodecSpec optimizer_state = CodecSpec::None();
  CodecSpec activation = CodecSpec::None();
  CodecSpec unspecified = CodecSpec::None();

  // Lossless for everything: the default, like hivemind's averagers.
  static CodecPolicy Uncompressed() { return CodecPolicy{}; }
  // One codec for every role above the size threshold.
  static CodecPolicy AllRoles(CodecSpec spec);
  // Our recommendation for bandwidth-bound training: gradients and optimizer state blockwise
  // 8-bit (robust to heavy tails, 3.99x smaller than float32), parameters scaled fp16 (parameters
  // are averaged, not summed, so their error stays in the model: keep ~3 decimal digits),
  // activations and the rest fp16.
  static CodecPolicy Recommended();

  const CodecSpec& ForRole(TensorRole role) const;
};

// The codec to send a tensor of num_elements elements of dtype with. Below the size threshold:
// kNone. A 16-bit codec (fp16, scaled fp16) on a tensor that is already 16-bit saves nothing and
// for bfloat16 would lose range, so it becomes kNone as well.
CodecSpec ChooseCodec(uint64_t num_elements, TensorRole role, const CodecPolicy& policy,
                      DType dtype = DType::kFloat32);

// Checks every spec of a policy (e.g. one built from user options); kInvalidArgument naming the
// role.
Status ValidatePolicy(const CodecPolicy& policy);

}  // namespace hivemind::averaging
