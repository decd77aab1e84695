// The numeric kernels of a round against plain loops: odd sizes, unaligned data, every position
// of a non-finite value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "averaging/reduce_kernels.h"

namespace hivemind::averaging {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> values(n);
  for (float& v : values) v = normal(rng);
  return values;
}

TEST(ReduceKernels, WeightedMeanMatchesADoubleLoopBitForBit) {
  for (size_t n : {0u, 1u, 7u, 2047u, 2048u, 2049u, 10000u}) {
    std::vector<std::vector<float>> inputs = {Random(n, 1), Random(n, 2), Random(n, 3)};
    std::vector<double> weights = {1.0, 0.5, 3.25};
    std::vector<const float*> pointers = {inputs[0].data(), inputs[1].data(), inputs[2].data()};
    std::vector<float> out(n, -1.0f);
    EXPECT_TRUE(WeightedMean(pointers.data(), weights.data(), 3, n, out.data()));
    for (size_t i = 0; i < n; ++i) {
      double sum = 0;
      for (int k = 0; k < 3; ++k) sum += weights[k] / 4.75 * static_cast<double>(inputs[k][i]);
      ASSERT_EQ(out[i], static_cast<float>(sum)) << "n=" << n << " i=" << i;
    }
  }
}

TEST(ReduceKernels, WeightedMeanOfNothingIsZero) {
  std::vector<float> out(5, 7.0f);
  EXPECT_TRUE(WeightedMean(nullptr, nullptr, 0, out.size(), out.data()));
  EXPECT_EQ(out, std::vector<float>(5, 0.0f));
}

TEST(ReduceKernels, EveryPositionOfANonFiniteValueIsFoundEvenUnaligned) {
  const size_t n = 4099;
  std::vector<float> values = Random(n, 4);
  EXPECT_TRUE(AllFinite(values.data(), n));
  // One byte of offset: the kernels must not assume alignment.
  std::vector<uint8_t> bytes(n * sizeof(float) + 1);
  for (float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN()}) {
    for (size_t at : {size_t{0}, size_t{1}, size_t{2047}, size_t{2048}, n - 1}) {
      std::vector<float> copy = values;
      copy[at] = bad;
      ASSERT_FALSE(AllFinite(copy.data(), n)) << at;
      std::memcpy(bytes.data() + 1, copy.data(), n * sizeof(float));
      ASSERT_FALSE(AllFinite(bytes.data() + 1, n)) << at;
      std::vector<float> out(n);
      ASSERT_FALSE(CopyFinite(copy.data(), n, out.data())) << at;
      // The mean stands for its inputs' check: whichever input, and however many inputs.
      for (size_t inputs : {1u, 2u, 3u}) {
        for (size_t which = 0; which < inputs; ++which) {
          std::vector<const float*> pointers(inputs, values.data());
          pointers[which] = copy.data();
          std::vector<double> weights(inputs, 0.25);
          ASSERT_FALSE(WeightedMean(pointers.data(), weights.data(), inputs, n, out.data()))
              << at << " in input " << which << " of " << inputs;
        }
      }
    }
  }
  // Finite inputs at the edge of the range: their mean is finite, whatever the weights.
  std::vector<float> huge(n, std::numeric_limits<float>::max());
  std::vector<float> negative_huge(n, -std::numeric_limits<float>::max());
  const float* edges[] = {huge.data(), huge.data(), negative_huge.data()};
  const double edge_weights[] = {1e-30, 3.0, 1e30};
  std::vector<float> mean(n);
  EXPECT_TRUE(WeightedMean(edges, edge_weights, 2, n, mean.data()));
  EXPECT_EQ(mean[0], std::numeric_limits<float>::max());
  EXPECT_TRUE(WeightedMean(edges + 1, edge_weights + 1, 2, n, mean.data()));
  float largest = std::numeric_limits<float>::max();
  EXPECT_TRUE(AllFinite(&largest, 1));
  std::vector<float> out(n);
  EXPECT_TRUE(CopyFinite(values.data(), n, out.data()));
  EXPECT_EQ(out, values);
}

TEST(ReduceKernels, ScaledCopyMatchesAFloatLoopAndFindsNonFiniteResults) {
  for (size_t n : {0u, 1u, 7u, 2048u, 4099u}) {
    std::vector<float> values = Random(n, 5);
    // One byte of offset on both sides: the kernel must not assume alignment.
    std::vector<uint8_t> in(n * sizeof(float) + 1), out(n * sizeof(float) + 1);
    if (n > 0) std::memcpy(in.data() + 1, values.data(), n * sizeof(float));
    auto* in_floats = reinterpret_cast<const float*>(in.data() + 1);
    auto* out_floats = reinterpret_cast<float*>(out.data() + 1);
    ASSERT_TRUE(ScaledCopyFinite(in_floats, n, 3.0f, out_floats)) << n;
    for (size_t i = 0; i < n; ++i) {
      float got;
      std::memcpy(&got, out.data() + 1 + i * sizeof(float), sizeof(got));
      ASSERT_EQ(got, values[i] * 3.0f) << "n=" << n << " i=" << i;
    }
  }
  const size_t n = 4099;
  std::vector<float> values = Random(n, 6);
  std::vector<float> out(n);
  for (size_t at : {size_t{0}, size_t{2047}, size_t{2048}, n - 1}) {
    std::vector<float> copy = values;
    copy[at] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_FALSE(ScaledCopyFinite(copy.data(), n, 1.0f, out.data())) << at;
    // Finite in, infinite out: the scale overflows, and the result is what is checked.
    copy[at] = std::numeric_limits<float>::max();
    EXPECT_FALSE(ScaledCopyFinite(copy.data(), n, 2.0f, out.data())) << at;
    EXPECT_TRUE(ScaledCopyFinite(copy.data(), n, 1.0f, out.data())) << at;
  }
}

TEST(ReduceKernels, TheStreamingScaledCopyWritesTheSameBitsAndFindsTheSameValues) {
  for (size_t n : {0u, 1u, 3u, 4u, 5u, 17u, 4099u}) {
    std::vector<float> values = Random(n + 8, 8);
    for (size_t offset : {0u, 1u, 2u, 3u}) {  // in floats: every alignment of `out`
      std::vector<float> plain(n + 8), streamed(n + 8, -1.0f);
      ASSERT_TRUE(ScaledCopyFinite(values.data(), n, 3.0f, plain.data() + offset));
      ASSERT_TRUE(ScaledCopyFiniteStreaming(values.data(), n, 3.0f, streamed.data() + offset));
      EXPECT_EQ(std::memcmp(plain.data() + offset, streamed.data() + offset, n * sizeof(float)), 0)
          << "n=" << n << " offset=" << offset;
      EXPECT_EQ(streamed[n + offset], -1.0f) << "wrote past the end";
      for (size_t at = 0; at < n; at += std::max<size_t>(1, n / 7)) {  // head, body and tail
        std::vector<float> copy = values;
        copy[at] = std::numeric_limits<float>::infinity();
        EXPECT_FALSE(ScaledCopyFiniteStreaming(copy.data(), n, 1.0f, streamed.data() + offset))
            << "n=" << n << " offset=" << offset << " at=" << at;
        copy[at] = std::numeric_limits<float>::max();  // overflows when scaled
        EXPECT_FALSE(ScaledCopyFiniteStreaming(copy.data(), n, 2.0f, streamed.data() + offset));
        EXPECT_TRUE(ScaledCopyFiniteStreaming(copy.data(), n, 1.0f, streamed.data() + offset));
      }
    }
  }
}

TEST(ReduceKernels, StreamingCopyCopiesEveryByteWhateverTheAlignment) {
  std::mt19937 rng(7);
  std::vector<uint8_t> source(5000);
  for (uint8_t& b : source) b = static_cast<uint8_t>(rng());
  for (size_t bytes : {0u, 1u, 15u, 16u, 17u, 63u, 64u, 1000u, 4096u}) {
    for (size_t from : {0u, 1u, 8u}) {
      for (size_t to : {0u, 3u, 16u}) {
        // Guard bytes around the destination: nothing outside [to, to + bytes) is written.
        std::vector<uint8_t> target(bytes + 40, 0xAB);
        StreamingCopy(source.data() + from, bytes, target.data() + to);
        for (size_t i = 0; i < target.size(); ++i) {
          const bool inside = i >= to && i < to + bytes;
          ASSERT_EQ(target[i], inside ? source[from + i - to] : 0xAB)
              << "bytes=" << bytes << " from=" << from << " to=" << to << " i=" << i;
        }
      }
    }
  }
}

}  // namespace
}  // namespace hivemind::averaging
