#pragma once

#include <array>

namespace hivemind::averaging {

// The signed "dynamic" code map of blockwise 8-bit quantization (Dettmers et al., 2022): 256
// sorted values in [-1, 1]. Decade d = 0..6 below 1 (values 10^(d-6) * [0.1, 1]) holds 2^d evenly
// spaced values on each side, so the map keeps ~3 significant digits of relative precision for
// large values and still resolves magnitudes down to ~5.5e-7 of a block's absmax; plus exact 0 and
// +1. Extremes are -0.99296875 and +1.
const std::array<float, 256>& SignedDynamicCodeMap();

}  // namespace hivemind::averaging
