#include "averaging/codec_policy.h"

#include <string>

namespace hivemind::averaging {

const char* TensorRoleName(TensorRole role) {
  switch (role) {
    case TensorRole::kUnspecified:
      return "unspecified";
    case TensorRole::kGradient:
      return "gradient";
    case TensorRole::kParameter:
      return "parameter";
    case TensorRole::kOptimizerState:
      return "optimizer-state";
    case TensorRole::kActivation:
      return "activation";
  }
  return "invalid-role";
}

CodecPolicy CodecPolicy::AllRoles(CodecSpec spec) {
  CodecPolicy policy;
  policy.gradient = policy.parameter = policy.optimizer_state = policy.activation =
      policy.unspecified = spec;
  return policy;
}

CodecPolicy CodecPolicy::Recommended() {
  CodecPolicy policy;
  policy.gradient = CodecSpec::Blockwise8();
  policy.optimizer_state = CodecSpec::Blockwise8();
  policy.parameter = CodecSpec::ScaledFloat16();
  policy.activation = CodecSpec::Float16();
  policy.unspecified = CodecSpec::Float16();
  return policy;
}

const CodecSpec& CodecPolicy::ForRole(TensorRole role) const {
  switch (role) {
    case TensorRole::kGradient:
      return gradient;
    case TensorRole::kParameter:
      return parameter;
    case TensorRole::kOptimizerState:
      return optimizer_state;
    case TensorRole::kActivation:
      return activation;
    case TensorRole::kUnspecified:
      break;
  }
  return unspecified;
}

CodecSpec ChooseCodec(uint64_t num_elements, TensorRole role, const CodecPolicy& policy,
                      DType dtype) {
  if (num_elements < policy.min_compressed_elements) return CodecSpec::None();
  const CodecSpec& spec = policy.ForRole(role);
  const bool sixteen_bit_codec = spec.id == CodecId::kFloat16 || spec.id == CodecId::kScaledFloat16;
  if (sixteen_bit_codec && DTypeSize(dtype) <= 2) return CodecSpec::None();
  return spec;
}

Status ValidatePolicy(const CodecPolicy& policy) {
  const TensorRole roles[] = {TensorRole::kUnspecified, TensorRole::kGradient,
                              TensorRole::kParameter, TensorRole::kOptimizerState,
                              TensorRole::kActivation};
  for (const TensorRole role : roles) {
    Status status = ValidateSpec(policy.ForRole(role));
    if (!status.ok()) return status.WithContext(std::string("codec for ") + TensorRoleName(role));
  }
  return Status::Ok();
}

}  // namespace hivemind::averaging
