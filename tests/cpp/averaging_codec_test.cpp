// Tensor codecs: exact conversions, error envelopes on N(0,1) and heavy-tailed data, special
// values, the policy, and decoders fed truncated, forged and random bytes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "averaging/codec.h"
#include "averaging/codec_blockwise8.h"
#include "averaging/codec_bucketize.h"
#include "averaging/codec_convert.h"
#include "averaging/codec_policy.h"

namespace hivemind::averaging {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

const CodecSpec kAllSpecs[] = {CodecSpec::None(),          CodecSpec::Float16(),
                               CodecSpec::ScaledFloat16(), CodecSpec::Uniform8(),
                               CodecSpec::Quantile8(),     CodecSpec::Blockwise8()};
const CodecSpec kLossy8Bit[] = {CodecSpec::Uniform8(), CodecSpec::Quantile8(),
                                CodecSpec::Blockwise8()};
const DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16};

std::string Name(const CodecSpec& spec) { return CodecName(spec.id); }

std::vector<float> Normal(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> values(n);
  for (float& v : values) v = dist(rng);
  return values;
}

std::vector<float> StudentT3(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::student_t_distribution<float> dist(3.0f);
  std::vector<float> values(n);
  for (float& v : values) v = dist(rng);
  return values;
}

TensorView View(const std::vector<float>& values) {
  return {values.data(), values.size(), DType::kFloat32};
}

std::vector<uint8_t> EncodeOrDie(const CodecSpec& spec, const TensorView& input,
                                 const EncodeOptions& options = {}) {
  Result<std::vector<uint8_t>> encoded = Encode(spec, input, options);
  EXPECT_TRUE(encoded.ok()) << Name(spec) << ": " << encoded.status().ToString();
  return encoded.ok() ? std::move(encoded).value() : std::vector<uint8_t>{};
}

std::vector<float> RoundTrip(const CodecSpec& spec, const std::vector<float>& values) {
  std::vector<uint8_t> encoded = EncodeOrDie(spec, View(values));
  std::vector<float> decoded(values.size());
  Status status = DecodeToFloat32(encoded.data(), encoded.size(), decoded.data(), decoded.size());
  EXPECT_TRUE(status.ok()) << Name(spec) << ": " << status.ToString();
  return decoded;
}

double Mse(const std::vector<float>& a, const std::vector<float>& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    sum += d * d;
  }
  return sum / static_cast<double>(a.size());
}

double MaxAbsError(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return worst;
}

// Little-endian float field of an encoded tensor, for forging payloads.
void PokeFloat(std::vector<uint8_t>* bytes, size_t offset, float value) {
  std::memcpy(bytes->data() + offset, &value, sizeof(value));
}
float PeekFloat(const std::vector<uint8_t>& bytes, size_t offset) {
  float value;
  std::memcpy(&value, bytes.data() + offset, sizeof(value));
  return value;
}

// ---- Conversions ----

TEST(CodecConvertTest, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    const bool nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0;
    if (nan) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
    } else {
      EXPECT_EQ(FloatToHalf(f), h) << std::hex << h;
    }
  }
  EXPECT_EQ(HalfToFloat(0x0001), 0x1p-24f);  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
}

#if defined(__FLT16_MAX__)
// GCC's _Float16 (software or F16C) is an independent round-to-nearest-even oracle in range.
TEST(CodecConvertTest, FloatToHalfRoundsToNearestEvenLikeTheCompiler) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits(0, 0x477fefffu);  // up to the last value -> 65504
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t b = bits(rng) | (i % 2 ? 0x80000000u : 0u);
    const float f = BitsToFloat(b);
    const _Float16 reference = static_cast<_Float16>(f);
    uint16_t expected;
    std::memcpy(&expected, &reference, 2);
    ASSERT_EQ(FloatToHalf(f), expected) << std::hexfloat << f;
  }
}
#endif

TEST(CodecConvertTest, FloatToHalfSpecialValues) {
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65519.99f), 0x7bff);  // rounds to 65504
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7bff);   // would round to inf: saturates
  EXPECT_EQ(FloatToHalf(1e30f), 0x7bff);
  EXPECT_EQ(FloatToHalf(-1e30f), 0xfbff);
  EXPECT_EQ(FloatToHalf(kInf), 0x7c00);
  EXPECT_EQ(FloatToHalf(-kInf), 0xfc00);
  EXPECT_EQ(FloatToHalf(kNaN) & 0x7e00, 0x7e00);
  EXPECT_EQ(FloatToHalf(0x1p-25f), 0x0000);    // tie between 0 and 2^-24: even (0)
  EXPECT_EQ(FloatToHalf(0x1.8p-25f), 0x0001);  // above the tie
  EXPECT_EQ(FloatToHalf(1e-40f), 0x0000);      // float denormal
  EXPECT_EQ(FloatToHalf(-1e-40f), 0x8000);
}

TEST(CodecConvertTest, BFloat16RoundTripAndRounding) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToBFloat16(f), b) << std::hex << b;
  }
  EXPECT_EQ(FloatToBFloat16(1.0f + 0x1p-8f), 0x3f80);  // tie, rounds to even
  EXPECT_EQ(FloatToBFloat16(1.0f + 0x1.8p-8f), 0x3f81);
  EXPECT_EQ(FloatToBFloat16(FLT_MAX), 0x7f7f);  // saturates instead of rounding to inf
  EXPECT_EQ(FloatToBFloat16(-FLT_MAX), 0xff7f);
  EXPECT_EQ(FloatToBFloat16(-kInf), 0xff80);
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(kNaN))));
}

// ---- Sizes and formats ----

TEST(CodecFormatTest, EncodedSizeIsExactAndMatchesTheLayouts) {
  const uint64_t n = 10000;  // three blocks of 4096, the last one short
  EXPECT_EQ(*EncodedSize(CodecSpec::None(), n, DType::kFloat64), 24 + 8 * n);
  EXPECT_EQ(*EncodedSize(CodecSpec::Float16(), n, DType::kFloat32), 24 + 2 * n);
  EXPECT_EQ(*EncodedSize(CodecSpec::ScaledFloat16(), n, DType::kFloat32), 24 + 3 * 8 + 2 * n);
  EXPECT_EQ(*EncodedSize(CodecSpec::Uniform8(), n, DType::kFloat32), 24 + 8 + n);
  EXPECT_EQ(*EncodedSize(CodecSpec::Quantile8(), n, DType::kFloat32), 24 + 1024 + n);
  EXPECT_EQ(*EncodedSize(CodecSpec::Blockwise8(), n, DType::kFloat32), 24 + 1024 + 3 * 4 + n);
  const std::vector<float> values = Normal(n, 1);
  for (const CodecSpec& spec : kAllSpecs) {
    EXPECT_EQ(EncodeOrDie(spec, View(values)).size(), *EncodedSize(spec, n, DType::kFloat32))
        << Name(spec);
  }
}

TEST(CodecFormatTest, SpecsAreValidated) {
  EXPECT_EQ(ValidateSpec({CodecId::kFloat16, 4096}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSpec(CodecSpec::Blockwise8(kMaxBlockSize + 1)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSpec({static_cast<CodecId>(9), 0}).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateSpec(CodecSpec::Blockwise8(0)).ok());  // 0 = default block size
  EXPECT_EQ(
      EncodedSize(CodecSpec::None(), kMaxEncodedElements + 1, DType::kFloat32).status().code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodedSize(CodecSpec::None(), 1, static_cast<DType>(0)).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(CodecFormatTest, EncodeToChecksCapacityAndInputs) {
  const std::vector<float> values = Normal(100, 2);
  std::vector<uint8_t> out(*EncodedSize(CodecSpec::Uniform8(), 100, DType::kFloat32));
  Result<size_t> written =
      EncodeTo(CodecSpec::Uniform8(), View(values), out.data(), out.size() - 1);
  EXPECT_EQ(written.status().code(), StatusCode::kInvalidArgument);
  written = EncodeTo(CodecSpec::Uniform8(), View(values), out.data(), out.size());
  ASSERT_TRUE(written.ok());
  EXPECT_EQ(*written, out.size());
  EXPECT_EQ(EncodeTo(CodecSpec::Uniform8(), {nullptr, 5, DType::kFloat32}, out.data(), out.size())
                .status()
                .code(),
            StatusCode::kInvalidArgument);
}

TEST(CodecFormatTest, EncodingIsDeterministicAndInspectable) {
  const std::vector<float> values = Normal(300000, 3);
  for (const CodecSpec& spec : kAllSpecs) {
    const std::vector<uint8_t> a = EncodeOrDie(spec, View(values));
    EXPECT_EQ(a, EncodeOrDie(spec, View(values))) << Name(spec);
    Result<EncodedInfo> info = InspectEncoded(a.data(), a.size());
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    EXPECT_EQ(info->codec, spec.id);
    EXPECT_EQ(info->dtype, DType::kFloat32);
    EXPECT_EQ(info->num_elements, values.size());
    EXPECT_EQ(info->block_size, spec.block_size);
  }
}

// ---- Error envelopes ----

// N(0,1), 2^20 elements, fixed seed: the figures quoted in docs/compression.md.
TEST(CodecEnvelopeTest, NormalDistributionMse) {
  const std::vector<float> values = Normal(size_t{1} << 20, 42);
  std::printf("codec            MSE on N(0,1), 2^20 elems   max |error|   bits/elem\n");
  double mse[6] = {};
  for (size_t c = 0; c < 6; ++c) {
    const CodecSpec& spec = kAllSpecs[c];
    const std::vector<float> decoded = RoundTrip(spec, values);
    mse[c] = Mse(values, decoded);
    const double bits = 8.0 * *EncodedSize(spec, values.size(), DType::kFloat32) /
                        static_cast<double>(values.size());
    std::printf("%-16s %-27.3e %-13.3e %.3f\n", Name(spec).c_str(), mse[c],
                MaxAbsError(values, decoded), bits);
  }
  EXPECT_EQ(mse[0], 0.0);
  EXPECT_LT(mse[1], 5e-8);  // fp16
  EXPECT_LT(mse[2], 5e-8);  // scaled fp16
  EXPECT_LT(mse[3], 8e-4);  // uniform 8-bit
  EXPECT_LT(mse[4], 8e-4);  // quantile 8-bit
  EXPECT_LT(mse[5], 8e-4);  // blockwise 8-bit
  // Tighter guards around the measured figures (docs/compression.md), to catch regressions.
  EXPECT_LT(mse[3], 1.5e-4);
  EXPECT_LT(mse[4], 3e-4);
  EXPECT_LT(mse[5], 2e-4);
}

// Heavy tails and outliers: where per-tensor ranges break down and blocks pay off.
TEST(CodecEnvelopeTest, BlockwiseBeatsUniformOnHeavyTailsAndOutliers) {
  const std::vector<float> t3 = StudentT3(size_t{1} << 20, 43);
  std::vector<float> spikes = Normal(size_t{1} << 20, 44);
  for (size_t i = 0; i < spikes.size(); i += 100000) spikes[i] = 1000.0f;  // 11 spikes
  std::printf("codec            MSE Student-t(3)   MSE N(0,1) + 11 spikes of 1000\n");
  double t3_mse[3] = {};
  double spikes_mse[3] = {};
  for (size_t c = 0; c < 3; ++c) {
    const CodecSpec& spec = kLossy8Bit[c];
    t3_mse[c] = Mse(t3, RoundTrip(spec, t3));
    spikes_mse[c] = Mse(spikes, RoundTrip(spec, spikes));
    std::printf("%-16s %-18.3e %.3e\n", Name(spec).c_str(), t3_mse[c], spikes_mse[c]);
  }
  const size_t uniform = 0, quantile = 1, blockwise = 2;
  EXPECT_LT(t3_mse[blockwise], t3_mse[uniform] / 10);
  EXPECT_LT(spikes_mse[blockwise], spikes_mse[uniform] / 100);
  // The fitted table follows heavy tails only as far as its sample sees them, but gives rare
  // extremes codes of their own.
  EXPECT_LT(t3_mse[quantile], t3_mse[uniform]);
  EXPECT_LT(spikes_mse[quantile], 8e-4);
}

// Uniform 8-bit: no clipping, every element within step / 2 of its value.
TEST(CodecEnvelopeTest, UniformErrorIsAtMostHalfAStep) {
  std::vector<std::vector<float>> cases = {Normal(100000, 5), StudentT3(100000, 6),
                                           Normal(100000, 7, 1e-20f), Normal(1000, 8, 1e20f)};
  std::vector<float> shifted = Normal(100000, 9);
  for (float& v : shifted) v += 1000.0f;  // large offset, small spread
  cases.push_back(shifted);
  for (const std::vector<float>& values : cases) {
    const std::vector<uint8_t> encoded = EncodeOrDie(CodecSpec::Uniform8(), View(values));
    const float lo = PeekFloat(encoded, 24);
    const float step = PeekFloat(encoded, 28);
    const float hi = *std::max_element(values.begin(), values.end());
    EXPECT_EQ(lo, *std::min_element(values.begin(), values.end()));
    EXPECT_NEAR(step, (static_cast<double>(hi) - lo) / 255, 1e-6 * step);
    std::vector<float> decoded(values.size());
    ASSERT_TRUE(
        DecodeToFloat32(encoded.data(), encoded.size(), decoded.data(), decoded.size()).ok());
    // Float32 rounding of lo + code * step adds at most an ulp of the largest magnitude.
    const double slack = 2.0 * FLT_EPSILON * std::max(std::fabs(lo), std::fabs(hi));
    EXPECT_LE(MaxAbsError(values, decoded), step / 2.0 * (1 + 1e-5) + slack) << "step " << step;
  }
}

// fp16: relative error 2^-11 in the normal range; scaled fp16: relative to each block's spread,
// so it keeps precision where plain fp16 saturates or underflows.
TEST(CodecEnvelopeTest, HalfPrecisionRelativeErrors) {
  std::vector<float> values = Normal(50000, 10);
  const std::vector<float> decoded = RoundTrip(CodecSpec::Float16(), values);
  for (size_t i = 0; i < values.size(); ++i) {
    if (std::fabs(values[i]) >= 0x1p-14f) {
      ASSERT_LE(std::fabs(decoded[i] - values[i]), std::fabs(values[i]) * 0x1p-11f) << values[i];
    } else {
      ASSERT_LE(std::fabs(decoded[i] - values[i]), 0x1p-25f);
    }
  }
  for (const float scale : {1e-12f, 1e6f, 1e30f}) {
    std::vector<float> scaled = Normal(50000, 11, scale);
    for (float& v : scaled) v += 3 * scale;
    const std::vector<float> back = RoundTrip(CodecSpec::ScaledFloat16(), scaled);
    // |z| < ~8 here, where half precision keeps 2^-11 relative: error <= 8 * 2^-11 * std.
    EXPECT_LE(MaxAbsError(scaled, back), 8 * 0x1p-11 * scale) << scale;
    EXPECT_LT(Mse(scaled, back) / (static_cast<double>(scale) * scale), 5e-8) << scale;
  }
}

// Blockwise: every code is the nearest map entry to x / absmax of its block.
TEST(CodecEnvelopeTest, BlockwiseCodesAreNearestMapEntries) {
  std::vector<float> values = StudentT3(3 * 4096 + 123, 12);
  for (size_t i = 4096; i < 8192; ++i) values[i] *= 1e-30f;   // a block of tiny values
  for (size_t i = 8192; i < 8192 + 4096; ++i) values[i] = 0;  // an all-zero block
  const std::vector<uint8_t> encoded = EncodeOrDie(CodecSpec::Blockwise8(), View(values));
  const std::array<float, 256>& map = SignedDynamicCodeMap();
  const size_t scales = 24 + 1024;
  const size_t codes = scales + 4 * 4;
  for (size_t i = 0; i < values.size(); ++i) {
    const float absmax = PeekFloat(encoded, scales + 4 * (i / 4096));
    const float s = absmax > 0 ? values[i] / absmax : 0.0f;
    const size_t code = encoded[codes + i];
    for (size_t k = 0; k < 256; ++k) {
      ASSERT_LE(std::fabs(map[code] - s), std::fabs(map[k] - s) * (1 + 1e-6f))
          << "element " << i << " got code " << code << " but " << k << " is nearer";
    }
  }
  const std::vector<float> decoded = RoundTrip(CodecSpec::Blockwise8(), values);
  for (size_t i = 8192; i < 8192 + 4096; ++i) ASSERT_EQ(decoded[i], 0.0f);
}

TEST(CodecEnvelopeTest, DynamicCodeMapShape) {
  const std::array<float, 256>& map = SignedDynamicCodeMap();
  EXPECT_TRUE(std::is_sorted(map.begin(), map.end()));
  EXPECT_EQ(std::adjacent_find(map.begin(), map.end()), map.end());  // strictly increasing
  EXPECT_FLOAT_EQ(map.front(), -0.99296875f);
  EXPECT_EQ(map.back(), 1.0f);
  EXPECT_EQ(map[127], 0.0f);
  EXPECT_FLOAT_EQ(map[128], 5.5e-7f);
  // The O(1) bucketizer needs at most one threshold per 16-bit prefix for this map.
  std::array<float, 255> mid{};
  for (size_t i = 0; i < 255; ++i) mid[i] = (map[i] + map[i + 1]) / 2;
  EXPECT_LE(Bucketizer(mid.data()).max_thresholds_per_entry(), 1u);
}

TEST(CodecEnvelopeTest, BucketizerMatchesBinarySearch) {
  std::mt19937 rng(13);
  std::vector<float> thresholds = Normal(255, 14);
  for (size_t i = 0; i < 40; ++i) thresholds[i] = 0.5f;  // duplicates and dense regions
  for (size_t i = 40; i < 80; ++i) thresholds[i] = 0.5f + static_cast<float>(i) * 1e-6f;
  std::sort(thresholds.begin(), thresholds.end());
  const Bucketizer bucketizer(thresholds.data());
  EXPECT_GT(bucketizer.max_thresholds_per_entry(), 1u);  // exercises the loop path
  std::vector<float> probes = Normal(200000, 15, 2.0f);
  probes.insert(probes.end(), thresholds.begin(), thresholds.end());
  for (const float t : thresholds) {
    probes.push_back(std::nextafter(t, -kInf));
    probes.push_back(std::nextafter(t, kInf));
  }
  probes.insert(probes.end(), {0.0f, -0.0f, FLT_MAX, -FLT_MAX, 1e-40f, -1e-40f});
  for (const float p : probes) {
    const auto expected = static_cast<uint32_t>(
        std::upper_bound(thresholds.begin(), thresholds.end(), p) - thresholds.begin());
    ASSERT_EQ(bucketizer.Index(p), expected) << std::hexfloat << p;
  }
}

// ---- Dtypes ----

std::vector<uint8_t> ToDType(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> bytes(values.size() * DTypeSize(dtype));
  StoreFromFloat32(dtype, values.data(), values.size(), bytes.data(), 0);
  return bytes;
}

TEST(CodecDTypeTest, EveryCodecDecodesToTheOriginalDTypeAndToFloat32) {
  const std::vector<float> source = Normal(20000, 16);
  for (const DType dtype : kAllDTypes) {
    const std::vector<uint8_t> input = ToDType(source, dtype);
    std::vector<float> reference(source.size());
    LoadAsFloat32(dtype, input.data(), 0, source.size(), reference.data());
    for (const CodecSpec& spec : kAllSpecs) {
      SCOPED_TRACE(Name(spec) + " on " + DTypeName(dtype));
      const std::vector<uint8_t> encoded = EncodeOrDie(spec, {input.data(), source.size(), dtype});
      std::vector<uint8_t> original(input.size());
      ASSERT_TRUE(
          Decode(encoded.data(), encoded.size(), {original.data(), source.size(), dtype}).ok());
      std::vector<float> as_float(source.size());
      ASSERT_TRUE(
          DecodeToFloat32(encoded.data(), encoded.size(), as_float.data(), as_float.size()).ok());
      std::vector<float> original_as_float(source.size());
      LoadAsFloat32(dtype, original.data(), 0, source.size(), original_as_float.data());
      const bool lossless =
          spec.id == CodecId::kNone || (spec.id == CodecId::kFloat16 && dtype == DType::kFloat16);
      if (lossless) {
        EXPECT_EQ(original, input);
        EXPECT_EQ(as_float, reference);
      } else {
        // Decoding to the original dtype only adds that dtype's rounding.
        const double tolerance =
            spec.id == CodecId::kFloat16 || spec.id == CodecId::kScaledFloat16 ? 5e-8 : 8e-4;
        EXPECT_LT(Mse(reference, as_float), tolerance);
        EXPECT_LT(Mse(reference, original_as_float),
                  tolerance + (dtype == DType::kBFloat16 ? 2e-5 : 1e-7));
      }
    }
  }
}

TEST(CodecDTypeTest, DecodeRefusesAnotherDTypeOrCount) {
  const std::vector<float> values = Normal(1000, 17);
  for (const CodecSpec& spec : kAllSpecs) {
    const std::vector<uint8_t> encoded = EncodeOrDie(spec, View(values));
    std::vector<double> wide(values.size());
    Status status =
        Decode(encoded.data(), encoded.size(), {wide.data(), wide.size(), DType::kFloat64});
    EXPECT_EQ(status.code(), StatusCode::kProtocolError) << status.ToString();
    std::vector<float> longer(values.size() + 1);
    status = DecodeToFloat32(encoded.data(), encoded.size(), longer.data(), longer.size());
    EXPECT_EQ(status.code(), StatusCode::kProtocolError) << status.ToString();
    EXPECT_NE(status.message().find("expects 1001"), std::string::npos) << status.message();
    status = DecodeToFloat32(encoded.data(), encoded.size(), nullptr, values.size());
    EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
  }
}

TEST(CodecDTypeTest, SmallAndOddSizesAndBlocks) {
  for (const uint64_t n : {0ull, 1ull, 2ull, 4095ull, 4096ull, 4097ull, 70001ull}) {
    const std::vector<float> values = Normal(static_cast<size_t>(n), 18);
    for (const CodecSpec& spec :
         {CodecSpec::None(), CodecSpec::Float16(), CodecSpec::ScaledFloat16(1),
          CodecSpec::ScaledFloat16(3), CodecSpec::ScaledFloat16(5000), CodecSpec::Uniform8(),
          CodecSpec::Quantile8(), CodecSpec::Blockwise8(1), CodecSpec::Blockwise8(7),
          CodecSpec::Blockwise8(5000)}) {
      const std::vector<float> decoded = RoundTrip(spec, values);
      ASSERT_EQ(decoded.size(), values.size());
      if (n > 0) {
        EXPECT_LT(Mse(values, decoded), 8e-4) << Name(spec) << " n=" << n;
      }
    }
  }
}

// ---- Special values ----

TEST(CodecSpecialValuesTest, NoneIsBitExactAndGatesNonFinite) {
  const std::vector<float> values = {0.0f, -0.0f, 1e-45f, -1e-40f, FLT_MAX, kInf, -kInf, kNaN};
  Result<std::vector<uint8_t>> refused = Encode(CodecSpec::None(), View(values));
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("element 5 is inf"), std::string::npos)
      << refused.status().message();
  EncodeOptions allow;
  allow.allow_non_finite = true;
  const std::vector<uint8_t> encoded = EncodeOrDie(CodecSpec::None(), View(values), allow);
  std::vector<float> decoded(values.size());
  Status status = DecodeToFloat32(encoded.data(), encoded.size(), decoded.data(), decoded.size());
  EXPECT_EQ(status.code(), StatusCode::kProtocolError);  // receivers refuse by default
  EXPECT_NE(status.message().find("element 5"), std::string::npos) << status.message();
  DecodeOptions accept;
  accept.allow_non_finite = true;
  ASSERT_TRUE(
      DecodeToFloat32(encoded.data(), encoded.size(), decoded.data(), decoded.size(), accept).ok());
  EXPECT_EQ(std::memcmp(decoded.data(), values.data(), values.size() * 4), 0);
}

TEST(CodecSpecialValuesTest, Float16SaturatesFlushesAndKeepsSigns) {
  const std::vector<float> values = {0.0f, -0.0f, 1e-40f,  -1e-40f,  1e-8f,   0x1p-24f,
                                     1e5f, -1e5f, FLT_MAX, 65504.0f, 3.14159f};
  const std::vector<float> decoded = RoundTrip(CodecSpec::Float16(), values);
  EXPECT_EQ(FloatBits(decoded[0]), FloatBits(0.0f));
  EXPECT_EQ(FloatBits(decoded[1]), FloatBits(-0.0f));
  EXPECT_EQ(FloatBits(decoded[2]), FloatBits(0.0f));               // float denormal flushes to +0
  EXPECT_EQ(FloatBits(decoded[3]), FloatBits(-0.0f));              // ... keeping the sign
  EXPECT_EQ(decoded[4], 0x1p-24f * std::round(1e-8f / 0x1p-24f));  // fp16 subnormal step
  EXPECT_EQ(decoded[5], 0x1p-24f);                                 // exact subnormal
  EXPECT_EQ(decoded[6], 65504.0f);
  EXPECT_EQ(decoded[7], -65504.0f);
  EXPECT_EQ(decoded[8], 65504.0f);
  EXPECT_EQ(decoded[9], 65504.0f);
  EXPECT_NEAR(decoded[10], 3.14159f, 3.14159f * 0x1p-11f);

  const std::vector<float> non_finite = {1.0f, kInf, -kInf, kNaN};
  EXPECT_EQ(Encode(CodecSpec::Float16(), View(non_finite)).status().code(),
            StatusCode::kInvalidArgument);
  EncodeOptions allow;
  allow.allow_non_finite = true;
  const std::vector<uint8_t> encoded = EncodeOrDie(CodecSpec::Float16(), View(non_finite), allow);
  std::vector<float> out(4);
  DecodeOptions accept;
  accept.allow_non_finite = true;
  EXPECT_EQ(DecodeToFloat32(encoded.data(), encoded.size(), out.data(), 4).code(),
            StatusCode::kProtocolError);
  ASSERT_TRUE(DecodeToFloat32(encoded.data(), encoded.size(), out.data(), 4, accept).ok());
  EXPECT_EQ(out[1], kInf);
  EXPECT_EQ(out[2], -kInf);
  EXPECT_TRUE(std::isnan(out[3]));
}

TEST(CodecSpecialValuesTest, NonFiniteInputIsRefusedByEveryOtherCodec) {
  EncodeOptions allow;
  allow.allow_non_finite = true;  // cannot make these codecs carry what they cannot represent
  for (const float bad : {kInf, -kInf, kNaN}) {
    std::vector<float> values = Normal(10000, 19);
    values[7777] = bad;
    for (const CodecSpec& spec : {CodecSpec::ScaledFloat16(), CodecSpec::Uniform8(),
                                  CodecSpec::Quantile8(), CodecSpec::Blockwise8()}) {
      Result<std::vector<uint8_t>> encoded = Encode(spec, View(values), allow);
      EXPECT_EQ(encoded.status().code(), StatusCode::kInvalidArgument) << Name(spec);
      EXPECT_NE(encoded.status().message().find("element 7777"), std::string::npos)
          << encoded.status().message();
    }
  }
  // float64 beyond the float32 range: the lossy codecs compute in float32.
  std::vector<double> wide(100, 1.0);
  wide[42] = 1e300;
  for (const CodecSpec& spec : kLossy8Bit) {
    Result<std::vector<uint8_t>> encoded =
        Encode(spec, {wide.data(), wide.size(), DType::kFloat64});
    EXPECT_EQ(encoded.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(encoded.status().message().find("out of the float32 range"), std::string::npos)
        << encoded.status().message();
  }
  EXPECT_TRUE(Encode(CodecSpec::None(), {wide.data(), wide.size(), DType::kFloat64}).ok());
}

TEST(CodecSpecialValuesTest, ZerosConstantsAndExtremeMagnitudes) {
  const std::vector<float> zeros(10000, 0.0f);
  const std::vector<float> constant(10000, -2.5f);
  for (const CodecSpec& spec : kAllSpecs) {
    EXPECT_EQ(RoundTrip(spec, zeros), zeros) << Name(spec);
    if (spec.id != CodecId::kBlockwise8) {
      // (blockwise stores -2.5 as absmax * map[0] = 2.5 * -0.99296875: its map has no -1)
      EXPECT_EQ(RoundTrip(spec, constant), constant) << Name(spec);
    }
  }
  // Denormals and mixed signs of zero survive as (signed or unsigned) zeros or tiny values.
  std::vector<float> tiny = Normal(10000, 20, 1e-39f);
  tiny[0] = -0.0f;
  for (const CodecSpec& spec : kAllSpecs) {
    const std::vector<float> decoded = RoundTrip(spec, tiny);
    EXPECT_LE(MaxAbsError(tiny, decoded), 1e-38) << Name(spec);
  }
  // Values near FLT_MAX: only scaled fp16 and the 8-bit codecs keep them; fp16 saturates.
  std::vector<float> huge = Normal(10000, 21, 1e37f);
  huge[5] = FLT_MAX / 3;
  huge[6] = -FLT_MAX / 8;  // a range of 0.46 * FLT_MAX: uniform 8-bit takes up to 0.5
  for (const CodecSpec& spec : {CodecSpec::ScaledFloat16(), CodecSpec::Uniform8(),
                                CodecSpec::Quantile8(), CodecSpec::Blockwise8()}) {
    const std::vector<float> decoded = RoundTrip(spec, huge);
    EXPECT_LT(Mse(huge, decoded) / 1e74, 1e-3) << Name(spec);
  }
  // A range wider than the float32 range is refused by uniform 8-bit rather than overflowing.
  const std::vector<float> span = {FLT_MAX, -FLT_MAX};
  EXPECT_EQ(Encode(CodecSpec::Uniform8(), View(span)).status().code(),
            StatusCode::kInvalidArgument);
}

// ---- Malformed input ----

TEST(CodecMalformedTest, EveryTruncationIsAProtocolError) {
  const std::vector<float> values = Normal(5000, 22);
  for (const CodecSpec& spec : kAllSpecs) {
    const std::vector<uint8_t> encoded = EncodeOrDie(spec, View(values));
    std::vector<float> out(values.size());
    for (size_t size = 0; size < encoded.size(); size += (size < 64 ? 1 : 97)) {
      const std::vector<uint8_t> cut(encoded.begin(), encoded.begin() + size);
      const Status status = DecodeToFloat32(cut.data(), cut.size(), out.data(), out.size());
      ASSERT_EQ(status.code(), StatusCode::kProtocolError) << Name(spec) << " size " << size;
    }
    std::vector<uint8_t> longer = encoded;
    longer.push_back(0);
    EXPECT_EQ(DecodeToFloat32(longer.data(), longer.size(), out.data(), out.size()).code(),
              StatusCode::kProtocolError);
  }
  EXPECT_EQ(DecodeToFloat32(nullptr, 0, nullptr, 0).code(), StatusCode::kProtocolError);
}

TEST(CodecMalformedTest, ForgedHeadersAreRefused) {
  const std::vector<float> values = Normal(5000, 23);
  const std::vector<uint8_t> good = EncodeOrDie(CodecSpec::Blockwise8(), View(values));
  std::vector<float> out(values.size());
  struct Forgery {
    size_t offset;
    uint8_t value;
    const char* expect;
  };
  const Forgery forgeries[] = {
      {0, 'x', "bad magic"},   {2, 2, "version"},       {3, 6, "unknown codec"},
      {4, 0, "unknown dtype"}, {4, 9, "unknown dtype"}, {5, 1, "reserved"},
      {20, 1, "reserved"},     {3, 2, "no blocks"},     {15, 0xff, "exceeds the limit"},
      {8, 0x89, "must be"},
  };
  for (const Forgery& forgery : forgeries) {
    std::vector<uint8_t> bad = good;
    bad[forgery.offset] = forgery.value;
    const Status status = DecodeToFloat32(bad.data(), bad.size(), out.data(), out.size());
    EXPECT_EQ(status.code(), StatusCode::kProtocolError) << forgery.expect;
    EXPECT_NE(status.message().find(forgery.expect), std::string::npos) << status.message();
  }
  for (const uint32_t block : {0u, kMaxBlockSize + 1}) {
    std::vector<uint8_t> bad = good;
    std::memcpy(bad.data() + 16, &block, 4);
    EXPECT_EQ(InspectEncoded(bad.data(), bad.size()).status().code(), StatusCode::kProtocolError);
  }
}

TEST(CodecMalformedTest, ForgedScalesAndTablesAreRefused) {
  const std::vector<float> values = Normal(5000, 24);
  std::vector<float> out(values.size());
  auto expect_refused = [&](const std::vector<uint8_t>& bytes, const char* what) {
    const Status status = DecodeToFloat32(bytes.data(), bytes.size(), out.data(), out.size());
    EXPECT_EQ(status.code(), StatusCode::kProtocolError) << what << ": " << status.ToString();
  };
  const std::vector<uint8_t> uniform = EncodeOrDie(CodecSpec::Uniform8(), View(values));
  for (const float lo : {kNaN, kInf}) {
    std::vector<uint8_t> bad = uniform;
    PokeFloat(&bad, 24, lo);
    expect_refused(bad, "uniform min");
  }
  for (const float step : {kNaN, -1.0f, FLT_MAX}) {
    std::vector<uint8_t> bad = uniform;
    PokeFloat(&bad, 28, step);
    expect_refused(bad, "uniform step");
  }
  {  // Valid-looking fields whose results overflow: caught by the output check.
    std::vector<uint8_t> bad = uniform;
    PokeFloat(&bad, 24, FLT_MAX);
    PokeFloat(&bad, 28, FLT_MAX / 256);
    expect_refused(bad, "uniform overflow");
  }
  const std::vector<uint8_t> scaled = EncodeOrDie(CodecSpec::ScaledFloat16(), View(values));
  for (const size_t offset : {size_t{24}, size_t{24 + 8}}) {  // mean[0], std[0]
    for (const float forged : {kNaN, -kInf}) {
      std::vector<uint8_t> bad = scaled;
      PokeFloat(&bad, offset, forged);
      expect_refused(bad, "scaled mean/std");
    }
  }
  {
    std::vector<uint8_t> bad = scaled;
    PokeFloat(&bad, 24 + 8, 0.0f);
    expect_refused(bad, "scaled zero std");
    bad = scaled;
    const uint16_t half_inf = 0x7c00;
    std::memcpy(bad.data() + 24 + 16 + 2 * 10, &half_inf, 2);
    expect_refused(bad, "scaled inf code");
  }
  const std::vector<uint8_t> blockwise = EncodeOrDie(CodecSpec::Blockwise8(), View(values));
  const size_t absmax0 = 24 + 1024;
  for (const float forged : {kNaN, kInf, -1.0f}) {
    std::vector<uint8_t> bad = blockwise;
    PokeFloat(&bad, absmax0 + 4, forged);
    expect_refused(bad, "blockwise absmax");
  }
  for (const float forged : {kNaN, 2.0f, -0.5f}) {  // not finite / out of [-1,1] / unsorted
    std::vector<uint8_t> bad = blockwise;
    PokeFloat(&bad, 24 + 4 * 3, forged);
    expect_refused(bad, "blockwise code map");
  }
  const std::vector<uint8_t> quantile = EncodeOrDie(CodecSpec::Quantile8(), View(values));
  for (const float forged : {kNaN, kInf, 100.0f}) {  // 100 at entry 3 breaks the order
    std::vector<uint8_t> bad = quantile;
    PokeFloat(&bad, 24 + 4 * 3, forged);
    expect_refused(bad, "quantile table");
  }
}

// Random bytes, random headers on random payloads and random mutations of valid encodings: the
// decoders must return an error or finite values, never crash or read out of bounds (run this
// under HIVEMIND_SANITIZE=ON to make the second half of that claim checkable).
TEST(CodecMalformedTest, FuzzedInputNeverCrashesOrDecodesNonFinite) {
  std::mt19937 rng(25);
  auto random_bytes = [&](size_t n) {
    std::vector<uint8_t> bytes(n);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
    return bytes;
  };
  std::vector<float> out(4096);
  size_t accepted = 0;
  auto attempt = [&](const std::vector<uint8_t>& bytes) {
    Result<EncodedInfo> info = InspectEncoded(bytes.data(), bytes.size());
    const uint64_t n = info.ok() ? info->num_elements : 1;
    if (n > out.size()) return;
    const Status status = DecodeToFloat32(bytes.data(), bytes.size(), out.data(), n);
    if (status.ok()) {
      ++accepted;
      for (uint64_t i = 0; i < n; ++i) ASSERT_TRUE(std::isfinite(out[i]));
    } else {
      ASSERT_TRUE(status.code() == StatusCode::kProtocolError) << status.ToString();
    }
  };
  for (int i = 0; i < 20000; ++i) attempt(random_bytes(rng() % 2048));
  const std::vector<float> values = StudentT3(1000, 26);
  for (const CodecSpec& spec : kAllSpecs) {
    const std::vector<uint8_t> good = EncodeOrDie(spec, View(values));
    for (int i = 0; i < 3000; ++i) {
      std::vector<uint8_t> bad = good;
      const int flips = 1 + static_cast<int>(rng() % 8);
      for (int f = 0; f < flips; ++f) bad[rng() % bad.size()] = static_cast<uint8_t>(rng());
      attempt(bad);
      // A valid header over a random payload of the right size.
      std::vector<uint8_t> noise = random_bytes(good.size());
      std::copy(good.begin(), good.begin() + kEncodedHeaderBytes, noise.begin());
      attempt(noise);
    }
  }
  EXPECT_GT(accepted, 0u);  // mutated codes (not scales) are still valid tensors
}

// ---- Policy ----

TEST(CodecPolicyTest, SizeRoleAndDType) {
  const CodecPolicy policy = CodecPolicy::Recommended();
  EXPECT_TRUE(ValidatePolicy(policy).ok());
  EXPECT_EQ(ChooseCodec(1000, TensorRole::kGradient, policy), CodecSpec::None());
  EXPECT_EQ(ChooseCodec((1 << 16) - 1, TensorRole::kGradient, policy), CodecSpec::None());
  EXPECT_EQ(ChooseCodec(1 << 16, TensorRole::kGradient, policy), CodecSpec::Blockwise8());
  EXPECT_EQ(ChooseCodec(1 << 20, TensorRole::kOptimizerState, policy), CodecSpec::Blockwise8());
  EXPECT_EQ(ChooseCodec(1 << 20, TensorRole::kParameter, policy), CodecSpec::ScaledFloat16());
  EXPECT_EQ(ChooseCodec(1 << 20, TensorRole::kActivation, policy), CodecSpec::Float16());
  EXPECT_EQ(ChooseCodec(1 << 20, TensorRole::kUnspecified, policy), CodecSpec::Float16());
  // 16-bit codecs on 16-bit tensors save nothing.
  EXPECT_EQ(ChooseCodec(1 << 20, TensorRole::kParameter, policy, DType::kBFloat16),
            CodecSpec::None());
  EXPECT_EQ(ChooseCodec(1 << 20, TensorRole::kGradient, policy, DType::kFloat16),
            CodecSpec::Blockwise8());
  EXPECT_EQ(ChooseCodec(1 << 20, TensorRole::kParameter, policy, DType::kFloat64),
            CodecSpec::ScaledFloat16());

  EXPECT_EQ(ChooseCodec(1 << 30, TensorRole::kGradient, CodecPolicy::Uncompressed()),
            CodecSpec::None());
  CodecPolicy all = CodecPolicy::AllRoles(CodecSpec::Uniform8());
  all.min_compressed_elements = 0;
  EXPECT_EQ(ChooseCodec(1, TensorRole::kParameter, all), CodecSpec::Uniform8());

  CodecPolicy broken = policy;
  broken.activation = {CodecId::kFloat16, 64};
  const Status status = ValidatePolicy(broken);
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("codec for activation"), std::string::npos) << status.message();
}

}  // namespace
}  // namespace hivemind::averaging
