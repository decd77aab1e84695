// Peer ids, identities (keys, signatures, identity files) and multiaddr parsing.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>

#include "net/address.h"
#include "net/base58.h"
#include "net/identity.h"
#include "net/peer_id.h"
#include "test_util.h"

namespace hivemind::net {
namespace {

using test::TempDir;

std::array<uint8_t, 32> Seed(uint8_t first) {
  std::array<uint8_t, 32> seed{};
  for (size_t i = 0; i < seed.size(); ++i) seed[i] = static_cast<uint8_t>(first + i);
  return seed;
}

unsigned FileMode(const std::string& path) {
  struct stat info {};
  EXPECT_EQ(::stat(path.c_str(), &info), 0) << path;
  return info.st_mode & 07777;
}

void WriteFile(const std::string& path, const std::string& text, unsigned mode) {
  {
    std::ofstream file(path, std::ios::trunc);
    file << text;
  }
  ASSERT_EQ(::chmod(path.c_str(), mode), 0);
}

// ---- PeerId ----

std::string FromHex(const std::string& hex) {
  std::string bytes;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    bytes.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return bytes;
}

// Bitcoin's published base58 test vectors (leading zero bytes are leading '1's).
TEST(Base58Test, KnownVectorsEncodeAndDecode) {
  const std::pair<std::string, std::string> vectors[] = {
      {"", ""},
      {"61", "2g"},
      {"626262", "a3gV"},
      {"636363", "aPEr"},
      {"73696d706c792061206c6f6e6720737472696e67", "2cFupjhnEsSn59qHXstmK2ffpLv2"},
      {"00eb15231dfceb60925886b67d065299925915aeb172c06647", "1NS17iag9jJgTHD1VXjvLCEnZuQ3rJDE9L"},
      {"516b6fcd0f", "ABnLTmg"},
      {"bf4f89001e670274dd", "3SEo3LWLoPntC"},
      {"572e4794", "3EFU7m"},
      {"ecac89cad93923c02321", "EJDM8drfXA6uyA"},
      {"10c8511e", "Rt5zm"},
      {"00000000000000000000", "1111111111"},
  };
  for (const auto& [hex, text] : vectors) {
    EXPECT_EQ(Base58Encode(FromHex(hex)), text) << hex;
    auto decoded = Base58Decode(text);
    ASSERT_TRUE(decoded.has_value()) << text;
    EXPECT_EQ(*decoded, FromHex(hex)) << text;
  }
}

// Lengths around the five-digit chunks and 32-bit limbs, with and without leading zero bytes.
TEST(Base58Test, RandomBytesRoundTrip) {
  std::mt19937 engine(11);
  for (size_t length = 0; length <= 80; ++length) {
    for (int zeros = 0; zeros <= 3; ++zeros) {
      std::string bytes(std::min<size_t>(zeros, length), '\0');
      while (bytes.size() < length) bytes.push_back(static_cast<char>(engine() & 0xff));
      const std::string text = Base58Encode(bytes);
      auto decoded = Base58Decode(text);
      ASSERT_TRUE(decoded.has_value()) << text;
      EXPECT_EQ(*decoded, bytes) << "length " << length << ", text " << text;
    }
  }
  EXPECT_FALSE(Base58Decode("abc0").has_value());
  EXPECT_FALSE(Base58Decode("\xff").has_value());
}

TEST(PeerIdTest, TextFormRoundTrips) {
  PeerId id = Identity::Generate().peer_id();
  std::string text = id.ToString();
  auto parsed = PeerId::FromString(text);
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(*parsed, id);
  EXPECT_EQ(parsed->ToString(), text);
}

TEST(PeerIdTest, RawBytesRoundTrip) {
  PeerId id = Identity::Generate().peer_id();
  auto parsed = PeerId::FromBytes(id.raw());
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(*parsed, id);
}

TEST(PeerIdTest, TextFormIsBase58) {
  std::string text = Identity::Generate().peer_id().ToString();
  EXPECT_FALSE(text.empty());
  EXPECT_EQ(text.find_first_not_of("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"),
            std::string::npos)
      << text;
}

TEST(PeerIdTest, CharactersOutsideBase58AreInvalidArgument) {
  std::string text = Identity::Generate().peer_id().ToString();
  for (char bad : {'0', 'O', 'I', 'l', '+', '/', ' '}) {
    std::string damaged = text;
    damaged[damaged.size() / 2] = bad;
    auto parsed = PeerId::FromString(damaged);
    ASSERT_FALSE(parsed.ok()) << damaged;
    EXPECT_EQ(parsed.status().code(), StatusCode::kInvalidArgument) << damaged;
    EXPECT_FALSE(parsed.status().message().empty());
  }
}

TEST(PeerIdTest, WrongLengthIsInvalidArgument) {
  std::string text = Identity::Generate().peer_id().ToString();
  for (const std::string& wrong : {text.substr(0, text.size() - 4), text + text.substr(0, 6),
                                   std::string("3yZe7d"), std::string()}) {
    auto parsed = PeerId::FromString(wrong);
    ASSERT_FALSE(parsed.ok()) << "'" << wrong << "'";
    EXPECT_EQ(parsed.status().code(), StatusCode::kInvalidArgument) << wrong;
  }
  auto short_raw = PeerId::FromBytes(std::string(31, 'x'));
  ASSERT_FALSE(short_raw.ok());
  EXPECT_EQ(short_raw.status().code(), StatusCode::kInvalidArgument);
  auto long_raw = PeerId::FromBytes(std::string(33, 'x'));
  ASSERT_FALSE(long_raw.ok());
  EXPECT_EQ(long_raw.status().code(), StatusCode::kInvalidArgument);
}

TEST(PeerIdTest, DefaultIsZeroAndGeneratedIsNot) {
  EXPECT_TRUE(PeerId().IsZero());
  EXPECT_FALSE(Identity::Generate().peer_id().IsZero());
}

TEST(PeerIdTest, ShortStringStartsLikeTheTextForm) {
  PeerId id = Identity::Generate().peer_id();
  std::string short_text = id.ShortString();
  ASSERT_GE(short_text.size(), 6u);
  EXPECT_EQ(id.ToString().substr(0, 6), short_text.substr(0, 6));
  EXPECT_LT(short_text.size(), id.ToString().size());
}

TEST(PeerIdTest, CurvePublicKeyMatchesTheIdentitysCurveKey) {
  Identity identity = Identity::Generate();
  auto curve = identity.peer_id().CurvePublicKey();
  ASSERT_TRUE(curve.ok()) << curve.status().ToString();
  EXPECT_EQ(*curve, identity.curve_public_key());
}

// ---- Identity: keys and signatures ----

TEST(IdentityTest, GenerateGivesDistinctIds) {
  std::set<PeerId> ids;
  for (int i = 0; i < 32; ++i) ids.insert(Identity::Generate().peer_id());
  EXPECT_EQ(ids.size(), 32u);
}

TEST(IdentityTest, FromSeedIsDeterministic) {
  Identity first = Identity::FromSeed(Seed(7));
  Identity again = Identity::FromSeed(Seed(7));
  Identity other = Identity::FromSeed(Seed(8));
  EXPECT_EQ(first.peer_id(), again.peer_id());
  EXPECT_EQ(first.curve_public_key(), again.curve_public_key());
  EXPECT_EQ(first.curve_secret_key(), again.curve_secret_key());
  EXPECT_NE(first.peer_id(), other.peer_id());
  EXPECT_NE(first.curve_public_key(), other.curve_public_key());
}

TEST(IdentityTest, CurveKeysDifferFromEachOther) {
  Identity identity = Identity::Generate();
  EXPECT_NE(identity.curve_public_key(), identity.curve_secret_key());
  EXPECT_NE(identity.curve_public_key(), identity.peer_id().bytes());
}

TEST(IdentityTest, SignatureVerifies) {
  Identity identity = Identity::Generate();
  std::string message = "store key=shard7 value=... expiration=1700000000";
  std::string signature = identity.Sign(message);
  EXPECT_TRUE(Identity::Verify(identity.peer_id(), message, signature));
}

TEST(IdentityTest, TamperedMessageFailsVerification) {
  Identity identity = Identity::Generate();
  std::string message = "record v1";
  std::string signature = identity.Sign(message);
  EXPECT_FALSE(Identity::Verify(identity.peer_id(), "record v2", signature));
  EXPECT_FALSE(Identity::Verify(identity.peer_id(), "", signature));
}

TEST(IdentityTest, TamperedSignatureFailsVerification) {
  Identity identity = Identity::Generate();
  std::string message = "record";
  std::string signature = identity.Sign(message);
  std::string flipped = signature;
  flipped[flipped.size() / 2] ^= 0x01;
  EXPECT_FALSE(Identity::Verify(identity.peer_id(), message, flipped));
  EXPECT_FALSE(Identity::Verify(identity.peer_id(), message, signature.substr(1)));
  EXPECT_FALSE(Identity::Verify(identity.peer_id(), message, ""));
}

TEST(IdentityTest, SignatureOfAnotherSignerFailsVerification) {
  Identity signer = Identity::Generate();
  Identity other = Identity::Generate();
  std::string signature = signer.Sign("record");
  EXPECT_FALSE(Identity::Verify(other.peer_id(), "record", signature));
}

// ---- Identity files ----

TEST(IdentityFileTest, SaveThenLoadGivesTheSameKeys) {
  TempDir dir;
  std::string path = dir.File("identity.key");
  Identity identity = Identity::Generate();
  Status saved = identity.Save(path);
  ASSERT_TRUE(saved.ok()) << saved.ToString();
  auto loaded = Identity::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ(loaded->peer_id(), identity.peer_id());
  EXPECT_EQ(loaded->curve_secret_key(), identity.curve_secret_key());
  // Ed25519 signatures are deterministic: the same secret key signs identically.
  EXPECT_EQ(loaded->Sign("hello"), identity.Sign("hello"));
}

TEST(IdentityFileTest, SavedFileHasMode0600) {
  TempDir dir;
  std::string path = dir.File("identity.key");
  ASSERT_TRUE(Identity::Generate().Save(path).ok());
  EXPECT_EQ(FileMode(path), 0600u);
}

TEST(IdentityFileTest, SaveLeavesNoTemporaryFileBehind) {
  TempDir dir;
  std::string path = dir.File("identity.key");
  ASSERT_TRUE(Identity::Generate().Save(path).ok());
  ASSERT_TRUE(Identity::Generate().Save(path).ok());  // overwrite
  int entries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    ++entries;
    EXPECT_EQ(entry.path().filename(), "identity.key");
  }
  EXPECT_EQ(entries, 1);
}

TEST(IdentityFileTest, LoadRefusesAFileOthersCanRead) {
  TempDir dir;
  std::string path = dir.File("identity.key");
  ASSERT_TRUE(Identity::Generate().Save(path).ok());
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
  auto loaded = Identity::Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.status().message().find(path), std::string::npos) << loaded.status().ToString();
}

TEST(IdentityFileTest, LoadOfAMissingFileIsNotFoundNamingTheFile) {
  TempDir dir;
  std::string path = dir.File("no-such.key");
  auto loaded = Identity::Load(path);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), StatusCode::kNotFound) << loaded.status().ToString();
  EXPECT_NE(loaded.status().message().find(path), std::string::npos) << loaded.status().ToString();
}

TEST(IdentityFileTest, LoadOfACorruptFileFailsNamingTheFile) {
  TempDir dir;
  std::string path = dir.File("corrupt.key");
  for (const std::string& content :
       {std::string("this is not a key\n"), std::string(), std::string("\x01\x02\x03\xff", 4)}) {
    WriteFile(path, content, 0600);
    auto loaded = Identity::Load(path);
    ASSERT_FALSE(loaded.ok()) << "content: '" << content << "'";
    EXPECT_NE(loaded.status().message().find(path), std::string::npos)
        << loaded.status().ToString();
  }
}

TEST(IdentityFileTest, LoadOfATruncatedSavedFileFails) {
  TempDir dir;
  std::string path = dir.File("identity.key");
  ASSERT_TRUE(Identity::Generate().Save(path).ok());
  std::string text;
  {
    std::ifstream file(path);
    std::getline(file, text);
  }
  ASSERT_GT(text.size(), 12u);
  WriteFile(path, text.substr(0, text.size() - 10) + "\n", 0600);
  EXPECT_FALSE(Identity::Load(path).ok());
}

TEST(IdentityFileTest, LoadOrCreateCreatesThenReloadsTheSameId) {
  TempDir dir;
  std::string path = dir.File("sub.key");
  auto created = Identity::LoadOrCreate(path);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  ASSERT_TRUE(std::filesystem::exists(path));
  EXPECT_EQ(FileMode(path), 0600u);
  auto reloaded = Identity::LoadOrCreate(path);
  ASSERT_TRUE(reloaded.ok()) << reloaded.status().ToString();
  EXPECT_EQ(reloaded->peer_id(), created->peer_id());
  auto loaded = Identity::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  EXPECT_EQ(loaded->peer_id(), created->peer_id());
}

TEST(IdentityFileTest, LoadOrCreateDoesNotOverwriteACorruptFile) {
  TempDir dir;
  std::string path = dir.File("corrupt.key");
  WriteFile(path, "garbage\n", 0600);
  EXPECT_FALSE(Identity::LoadOrCreate(path).ok());
  std::ifstream file(path);
  std::string text;
  std::getline(file, text);
  EXPECT_EQ(text, "garbage");
}

// ---- Endpoint and PeerAddress ----

class AddressTest : public ::testing::Test {
 protected:
  PeerId id_ = Identity::Generate().peer_id();
  std::string id_text_ = id_.ToString();
};

TEST_F(AddressTest, ParsesIp4WithPeerId) {
  auto address = PeerAddress::Parse("/ip4/127.0.0.1/tcp/4000/p2p/" + id_text_);
  ASSERT_TRUE(address.ok()) << address.status().ToString();
  EXPECT_EQ(address->peer_id, id_);
  ASSERT_EQ(address->endpoints.size(), 1u);
  EXPECT_EQ(address->endpoints[0].kind, Endpoint::Kind::kIp4);
  EXPECT_EQ(address->endpoints[0].host, "127.0.0.1");
  EXPECT_EQ(address->endpoints[0].port, 4000);
  EXPECT_EQ(address->endpoints[0].ZmqEndpoint(), "tcp://127.0.0.1:4000");
}

TEST_F(AddressTest, ParsesIp6WithPeerId) {
  auto address = PeerAddress::Parse("/ip6/::1/tcp/4000/p2p/" + id_text_);
  ASSERT_TRUE(address.ok()) << address.status().ToString();
  EXPECT_EQ(address->peer_id, id_);
  ASSERT_EQ(address->endpoints.size(), 1u);
  EXPECT_EQ(address->endpoints[0].kind, Endpoint::Kind::kIp6);
  EXPECT_EQ(address->endpoints[0].host, "::1");
  EXPECT_EQ(address->endpoints[0].port, 4000);
  EXPECT_EQ(address->endpoints[0].ZmqEndpoint(), "tcp://[::1]:4000");
}

TEST_F(AddressTest, ParsesDnsWithPeerId) {
  for (const char* protocol : {"dns", "dns4", "dns6"}) {
    auto address = PeerAddress::Parse(std::string("/") + protocol +
                                      "/bootstrap.example.org/tcp/31337/p2p/" + id_text_);
    ASSERT_TRUE(address.ok()) << protocol << ": " << address.status().ToString();
    EXPECT_EQ(address->peer_id, id_);
    ASSERT_EQ(address->endpoints.size(), 1u);
    EXPECT_EQ(address->endpoints[0].kind, Endpoint::Kind::kDns);
    EXPECT_EQ(address->endpoints[0].host, "bootstrap.example.org");
    EXPECT_EQ(address->endpoints[0].port, 31337);
    EXPECT_EQ(address->endpoints[0].ZmqEndpoint(), "tcp://bootstrap.example.org:31337");
  }
}

TEST_F(AddressTest, EndpointParsesWithoutPeerId) {
  auto endpoint = Endpoint::Parse("/ip4/127.0.0.1/tcp/0");
  ASSERT_TRUE(endpoint.ok()) << endpoint.status().ToString();
  EXPECT_EQ(endpoint->kind, Endpoint::Kind::kIp4);
  EXPECT_EQ(endpoint->host, "127.0.0.1");
  EXPECT_EQ(endpoint->port, 0);
  EXPECT_EQ(endpoint->ToString(), "/ip4/127.0.0.1/tcp/0");
  auto ip6 = Endpoint::Parse("/ip6/::1/tcp/65535");
  ASSERT_TRUE(ip6.ok()) << ip6.status().ToString();
  EXPECT_EQ(ip6->port, 65535);
  EXPECT_EQ(ip6->ZmqEndpoint(), "tcp://[::1]:65535");
}

TEST_F(AddressTest, ParseListJoinsSeveralAddressesOfOnePeer) {
  std::string list = "/ip4/127.0.0.1/tcp/4000/p2p/" + id_text_ + " /ip6/::1/tcp/4001/p2p/" +
                     id_text_ + ",/dns/node.example/tcp/4002/p2p/" + id_text_;
  auto address = PeerAddress::ParseList(list);
  ASSERT_TRUE(address.ok()) << address.status().ToString();
  EXPECT_EQ(address->peer_id, id_);
  ASSERT_EQ(address->endpoints.size(), 3u);
  EXPECT_EQ(address->endpoints[0].ZmqEndpoint(), "tcp://127.0.0.1:4000");
  EXPECT_EQ(address->endpoints[1].ZmqEndpoint(), "tcp://[::1]:4001");
  EXPECT_EQ(address->endpoints[2].ZmqEndpoint(), "tcp://node.example:4002");
}

TEST_F(AddressTest, ParseListRefusesAddressesOfDifferentPeers) {
  std::string other = Identity::Generate().peer_id().ToString();
  auto address = PeerAddress::ParseList("/ip4/127.0.0.1/tcp/4000/p2p/" + id_text_ +
                                        " /ip4/127.0.0.1/tcp/4001/p2p/" + other);
  ASSERT_FALSE(address.ok());
  EXPECT_EQ(address.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(AddressTest, ParseListRefusesOneBadAddressAmongGoodOnes) {
  auto address = PeerAddress::ParseList("/ip4/127.0.0.1/tcp/4000/p2p/" + id_text_ +
                                        " /ip4/127.0.0.1/tcp/99999/p2p/" + id_text_);
  ASSERT_FALSE(address.ok());
  EXPECT_EQ(address.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(AddressTest, ParseListOfNothingIsInvalidArgument) {
  auto address = PeerAddress::ParseList("");
  ASSERT_FALSE(address.ok());
  EXPECT_EQ(address.status().code(), StatusCode::kInvalidArgument);
}

struct MalformedCase {
  std::string what;
  std::string address;   // "<id>" is replaced by a valid peer id
  std::string mentions;  // the message should name the problem
};

TEST_F(AddressTest, MalformedAddressesAreInvalidArgumentWithAHelpfulMessage) {
  const std::vector<MalformedCase> cases = {
      {"missing port", "/ip4/127.0.0.1/tcp/p2p/<id>", "port"},
      {"port out of range", "/ip4/127.0.0.1/tcp/70000/p2p/<id>", "70000"},
      {"unknown protocol", "/ipx/127.0.0.1/tcp/4000/p2p/<id>", "ipx"},
      {"missing /p2p/", "/ip4/127.0.0.1/tcp/4000", "p2p"},
      {"bad peer id", "/ip4/127.0.0.1/tcp/4000/p2p/NotAPeerId0OIl", "NotAPeerId0OIl"},
      {"short peer id", "/ip4/127.0.0.1/tcp/4000/p2p/3yZe7d", "3yZe7d"},
      {"bad IPv4", "/ip4/300.1.2.3/tcp/4000/p2p/<id>", "300.1.2.3"},
      {"bad IPv6", "/ip6/not:an:ip6:zz/tcp/4000/p2p/<id>", "not:an:ip6:zz"},
      {"no leading slash", "ip4/127.0.0.1/tcp/4000/p2p/<id>", "ip4"},
      {"empty", "", ""},
  };
  for (const auto& c : cases) {
    std::string text = c.address;
    auto at = text.find("<id>");
    if (at != std::string::npos) text.replace(at, 4, id_text_);
    auto address = PeerAddress::Parse(text);
    ASSERT_FALSE(address.ok()) << c.what << ": " << text;
    EXPECT_EQ(address.status().code(), StatusCode::kInvalidArgument) << c.what;
    EXPECT_FALSE(address.status().message().empty()) << c.what;
    EXPECT_NE(address.status().message().find(c.mentions), std::string::npos)
        << c.what << ": message does not mention '" << c.mentions
        << "': " << address.status().ToString();
  }
}

TEST_F(AddressTest, MalformedEndpointsAreInvalidArgument) {
  for (const std::string& text :
       {std::string("/ip4/127.0.0.1/tcp"), std::string("/ip4/127.0.0.1/tcp/70000"),
        std::string("/ipx/127.0.0.1/tcp/1"), std::string("/ip4/127.0.0.1/udp/4000"),
        std::string("/ip4/127.0.0.1/tcp/-1"), std::string("/ip4/127.0.0.1/tcp/12ab")}) {
    auto endpoint = Endpoint::Parse(text);
    ASSERT_FALSE(endpoint.ok()) << text;
    EXPECT_EQ(endpoint.status().code(), StatusCode::kInvalidArgument) << text;
  }
}

TEST_F(AddressTest, ToStringRoundTrips) {
  for (const std::string& text :
       {"/ip4/127.0.0.1/tcp/4000/p2p/" + id_text_, "/ip6/::1/tcp/4000/p2p/" + id_text_,
        "/dns/bootstrap.example.org/tcp/31337/p2p/" + id_text_}) {
    auto address = PeerAddress::Parse(text);
    ASSERT_TRUE(address.ok()) << address.status().ToString();
    EXPECT_EQ(address->ToString(), text);
    ASSERT_EQ(address->ToStrings().size(), 1u);
    EXPECT_EQ(address->ToStrings()[0], text);
  }
}

TEST_F(AddressTest, ListToStringRoundTripsThroughParseList) {
  std::string list =
      "/ip4/127.0.0.1/tcp/4000/p2p/" + id_text_ + " /ip6/::1/tcp/4001/p2p/" + id_text_;
  auto address = PeerAddress::ParseList(list);
  ASSERT_TRUE(address.ok()) << address.status().ToString();
  EXPECT_EQ(address->ToString(), list);
  auto again = PeerAddress::ParseList(address->ToString());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->peer_id, id_);
  EXPECT_EQ(again->endpoints, address->endpoints);
}

TEST_F(AddressTest, EndpointToStringRoundTrips) {
  for (const std::string& text :
       {std::string("/ip4/10.0.0.7/tcp/1"), std::string("/ip6/fe80::1/tcp/31337"),
        std::string("/dns/example.org/tcp/443")}) {
    auto endpoint = Endpoint::Parse(text);
    ASSERT_TRUE(endpoint.ok()) << endpoint.status().ToString();
    EXPECT_EQ(endpoint->ToString(), text);
    auto again = Endpoint::Parse(endpoint->ToString());
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*again, *endpoint);
  }
}

}  // namespace
}  // namespace hivemind::net
