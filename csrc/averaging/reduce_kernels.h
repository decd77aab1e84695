// The arithmetic of a round: finiteness checks, the weighted mean of a part, the checked copy of a
// received part, and the c10d backend's checked, scaled copy of its tensors. Built with -O3
// (CMakeLists.txt): at -O2 GCC leaves these loops scalar, and they were a fifth of a 64 MiB round.
// Pointers need not be aligned.
#pragma once

#include <cstddef>

namespace hivemind::averaging {

// True when none of the `count` floats at `data` is inf or NaN.
bool AllFinite(const void* data, size_t count);

// out[i] = sum_k (weights[k] / W) * inputs[k][i] with W = sum_k weights[k], accumulated in double
// in the order of `inputs` (so the result depends only on the inputs and their order); zeros when
// the weights sum to zero. Returns whether every result is finite. With positive weights that
// is exactly whether every input is: a non-finite input makes its results inf or NaN, and a mean
// of finite floats lies between them, so it cannot overflow.
bool WeightedMean(const float* const* inputs, const double* weights, size_t num_inputs,
                  size_t count, float* out);

// Copies `count` floats from `in` to `out`; false (after copying) when any of them is not finite.
bool CopyFinite(const float* in, size_t count, float* out);

// out[i] = in[i] * scale (in float, as torch's `mul_` by a scalar); false (after writing) when any
// result is not finite. One pass where copy, scale and check would make three.
bool ScaledCopyFinite(const float* in, size_t count, float scale, float* out);

// ScaledCopyFinite with non-temporal stores (see StreamingCopy), for an `out` far larger than the
// caches, which a plain copy would first read line by line. The same bits.
bool ScaledCopyFiniteStreaming(const float* in, size_t count, float scale, float* out);

// Copies `bytes` from `in` to `out` past the caches (non-temporal stores, where the CPU has them),
// for a destination nobody reads soon, such as the tensor a round mirrors its results into: a
// plain copy first reads every destination line it writes. The copy is complete, and ordered
// before this thread's later stores, when it returns.
void StreamingCopy(const void* in, size_t bytes, void* out);

}  // namespace hivemind::averaging
