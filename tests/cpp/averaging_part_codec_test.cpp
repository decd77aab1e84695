// PartCodec: how a part of the averaged vector is cut into raw and encoded pieces, and what a
// receiver refuses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "averaging/part_codec.h"

namespace hivemind::averaging {
namespace {

net::Payload Floats(const std::vector<float>& values) {
  return net::Payload::Copy(values.data(), values.size() * sizeof(float));
}

std::vector<float> Random(size_t n) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(n);
  for (float& v : values) v = normal(rng);
  return values;
}

TEST(PartCodec, LosslessPassesRawFloatsThroughWithoutACopy) {
  PartCodec codec;
  EXPECT_TRUE(codec.lossless());
  EXPECT_TRUE(codec.digest().empty());
  net::Payload values = Floats(Random(100));
  auto encoded = codec.Encode(values, 40);
  ASSERT_TRUE(encoded.ok());
  ASSERT_EQ(encoded->size(), 1u);
  EXPECT_EQ((*encoded)[0].data(), values.data());
  auto decoded = codec.Decode(*encoded, 40, 100);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(decoded->data(), values.data());
}

TEST(PartCodec, SpansAreCutAtRangeBoundariesAndRoundTrip) {
  auto codec = PartCodec::Make({{10, 20, CodecSpec::Float16()},
                                {30, 5, CodecSpec::None()},  // raw anyway: dropped
                                {50, 100, CodecSpec::Blockwise8(64)}},
                               200);
  ASSERT_TRUE(codec.ok()) << codec.status().ToString();
  EXPECT_FALSE(codec->lossless());
  EXPECT_EQ(codec->digest().size(), 16u);
  std::vector<float> values = Random(100);  // elements [0, 100)
  auto encoded = codec->Encode(Floats(values), 0);
  ASSERT_TRUE(encoded.ok());
  // raw [0,10), fp16 [10,30), raw [30,50), blockwise [50,100)
  ASSERT_EQ(encoded->size(), 4u);
  EXPECT_EQ((*encoded)[0].size(), 10 * sizeof(float));
  EXPECT_EQ((*encoded)[2].size(), 20 * sizeof(float));
  std::vector<float> out(100);
  ASSERT_TRUE(codec->DecodeInto(*encoded, 0, 100, out.data()).ok());
  for (size_t i = 0; i < 100; ++i) {
    bool raw = i < 10 || (i >= 30 && i < 50);
    if (raw) {
      EXPECT_EQ(out[i], values[i]) << i;
    } else {
      EXPECT_NEAR(out[i], values[i], 0.05) << i;
    }
  }
  // A span that starts inside a range: [60, 160) is blockwise [60,150) + raw [150,160).
  auto inside = codec->Encode(Floats(Random(100)), 60);
  ASSERT_TRUE(inside.ok());
  EXPECT_EQ(inside->size(), 2u);
  EXPECT_EQ((*inside)[1].size(), 10 * sizeof(float));
}

TEST(PartCodec, DigestsDifferWhenRangesOrCodecsDo) {
  auto a = PartCodec::Make({{0, 10, CodecSpec::Float16()}}, 10);
  auto b = PartCodec::Make({{0, 10, CodecSpec::Uniform8()}}, 10);
  auto c = PartCodec::Make({{0, 9, CodecSpec::Float16()}}, 10);
  auto d = PartCodec::Make({{0, 10, CodecSpec::Float16()}}, 10);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok() && d.ok());
  EXPECT_NE(a->digest(), b->digest());
  EXPECT_NE(a->digest(), c->digest());
  EXPECT_EQ(a->digest(), d->digest());
}

TEST(PartCodec, BadRangesAreRefusedNamingThem) {
  auto overlap =
      PartCodec::Make({{0, 10, CodecSpec::Float16()}, {5, 10, CodecSpec::Float16()}}, 100);
  EXPECT_EQ(overlap.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(overlap.status().message().find("[5, 15)"), std::string::npos);
  EXPECT_FALSE(PartCodec::Make({{90, 20, CodecSpec::Float16()}}, 100).ok());
  EXPECT_FALSE(PartCodec::Make({{0, 10, CodecSpec{CodecId::kFloat16, 64}}}, 100).ok());
}

TEST(PartCodec, MalformedPayloadsAreRefused) {
  auto codec = PartCodec::Make({{10, 20, CodecSpec::Uniform8()}}, 100);
  ASSERT_TRUE(codec.ok());
  std::vector<float> values = Random(40);
  auto good = codec->Encode(Floats(values), 0);
  ASSERT_TRUE(good.ok());
  ASSERT_EQ(good->size(), 3u);
  std::vector<float> out(40);
  ASSERT_TRUE(codec->DecodeInto(*good, 0, 40, out.data()).ok());

  auto expect_refused = [&](std::vector<net::Payload> payloads, const char* why) {
    Status status = codec->DecodeInto(payloads, 0, 40, out.data());
    EXPECT_EQ(status.code(), StatusCode::kInvalidArgument) << why;
    EXPECT_FALSE(codec->Decode(payloads, 0, 40).ok()) << why;
  };
  expect_refused({(*good)[0], (*good)[1]}, "a missing piece");
  auto short_raw = *good;
  short_raw[0] = net::Payload::Copy(values.data(), 9 * sizeof(float));
  expect_refused(short_raw, "a short raw piece");
  auto truncated = *good;
  truncated[1] = net::Payload::Copy((*good)[1].data(), (*good)[1].size() - 1);
  expect_refused(truncated, "a truncated encoding");
  auto other_codec = *good;
  auto fp16 = PartCodec::Make({{10, 20, CodecSpec::Float16()}}, 100)->Encode(Floats(values), 0);
  other_codec[1] = (*fp16)[1];
  expect_refused(other_codec, "another codec");
  auto nan = *good;
  std::vector<float> tail(values.begin() + 30, values.end());
  tail[3] = std::numeric_limits<float>::quiet_NaN();
  nan[2] = Floats(tail);
  expect_refused(nan, "a NaN in a raw piece");
}

}  // namespace
}  // namespace hivemind::averaging
