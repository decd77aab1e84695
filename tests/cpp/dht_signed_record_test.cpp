// The signed-record validator: only an owner's Ed25519 identity can write records whose key or
// subkey names it.
#include <gtest/gtest.h>

#include "dht/signed_record_validator.h"

namespace hivemind::dht {
namespace {

constexpr DhtTime kNow = 1'000'000.0;

net::Identity IdentityFrom(uint8_t byte) {
  std::array<uint8_t, 32> seed{};
  seed.fill(byte);
  return net::Identity::FromSeed(seed);
}

DhtRecord OwnedBySubkey(const net::Identity& owner, std::string value, DhtTime expiration) {
  const std::string key = "run42_progress";
  return DhtRecord{DhtId::OfKey(key), key, SignedRecordValidator::OwnerMarker(owner.peer_id()),
                   std::move(value), expiration};
}

TEST(SignedRecordValidatorTest, OwnerSignsAndEveryoneVerifiesAndStrips) {
  const net::Identity alice = IdentityFrom(1);
  SignedRecordValidator signer(alice);
  SignedRecordValidator verifier;
  DhtRecord record = OwnedBySubkey(alice, "progress=7", kNow + 60);
  auto signed_value = signer.Sign(record);
  ASSERT_TRUE(signed_value.ok()) << signed_value.status().ToString();
  EXPECT_NE(*signed_value, record.value);
  record.value = *signed_value;
  EXPECT_TRUE(verifier.Validate(record).ok());
  EXPECT_EQ(verifier.Strip(record), "progress=7");
}

TEST(SignedRecordValidatorTest, ForgeriesAndTamperingAreRefused) {
  const net::Identity alice = IdentityFrom(1);
  const net::Identity mallory = IdentityFrom(2);
  SignedRecordValidator verifier;
  DhtRecord record = OwnedBySubkey(alice, "progress=7", kNow + 60);

  // Unsigned.
  Status unsigned_status = verifier.Validate(record);
  EXPECT_EQ(unsigned_status.code(), StatusCode::kPermissionDenied);
  EXPECT_NE(unsigned_status.message().find("no signature"), std::string::npos);

  // Mallory cannot sign for Alice...
  SignedRecordValidator mallory_signer(mallory);
  auto refused = mallory_signer.Sign(record);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kPermissionDenied);
  // ...and a value she signs with her own key does not verify as Alice's.
  DhtRecord as_mallory = OwnedBySubkey(mallory, "progress=7", kNow + 60);
  DhtRecord forged = record;
  forged.value = *mallory_signer.Sign(as_mallory);
  EXPECT_EQ(verifier.Validate(forged).code(), StatusCode::kPermissionDenied);

  // Alice's genuine signature does not cover a changed value or expiration.
  SignedRecordValidator alice_signer(alice);
  DhtRecord genuine = record;
  genuine.value = *alice_signer.Sign(record);
  DhtRecord tampered = genuine;
  tampered.value[0] = 'P';
  EXPECT_EQ(verifier.Validate(tampered).code(), StatusCode::kPermissionDenied);
  DhtRecord extended = genuine;
  extended.expiration += 1000;
  EXPECT_EQ(verifier.Validate(extended).code(), StatusCode::kPermissionDenied);
  DhtRecord moved = genuine;
  moved.key_id = DhtId::OfKey("another key");
  EXPECT_EQ(verifier.Validate(moved).code(), StatusCode::kPermissionDenied);
}

TEST(SignedRecordValidatorTest, OwnerInTheKeyNeedsTheRawKey) {
  const net::Identity alice = IdentityFrom(1);
  SignedRecordValidator signer(alice);
  const std::string key = "profile" + SignedRecordValidator::OwnerMarker(alice.peer_id());
  EXPECT_TRUE(signer.NeedsRawKey(key));
  EXPECT_FALSE(signer.NeedsRawKey("plain key"));
  DhtRecord record{DhtId::OfKey(key), key, std::nullopt, "hello", kNow + 60};
  record.value = *signer.Sign(record);
  EXPECT_TRUE(SignedRecordValidator().Validate(record).ok());
  DhtRecord unsigned_record{DhtId::OfKey(key), key, std::nullopt, "hello", kNow + 60};
  EXPECT_FALSE(SignedRecordValidator().Validate(unsigned_record).ok());
}

TEST(SignedRecordValidatorTest, UnownedRecordsPassAndBadMarkersAreErrors) {
  SignedRecordValidator verifier;
  DhtRecord plain{DhtId::OfKey("k"), std::string("k"), std::string("sub"), "v", kNow + 1};
  EXPECT_TRUE(verifier.Validate(plain).ok());
  EXPECT_EQ(verifier.Strip(plain), "v");
  DhtRecord bad{DhtId::OfKey("k"), std::string("k"), std::string("[owner:not base58 !]"), "v",
                kNow + 1};
  EXPECT_EQ(verifier.Validate(bad).code(), StatusCode::kInvalidArgument);
  DhtRecord open{DhtId::OfKey("k"), std::string("k"), std::string("[owner:abc"), "v", kNow + 1};
  EXPECT_EQ(verifier.Validate(open).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace hivemind::dht
