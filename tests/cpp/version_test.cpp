#include "common/version.h"

#include <gtest/gtest.h>
#include <sodium.h>
#include <zmq.h>

#include <regex>
#include <string>

namespace hivemind {
namespace {

const std::regex kSemver(R"(\d+\.\d+\.\d+)");

TEST(VersionTest, ProjectVersionIsSemver) {
  const std::string version = Version();
  EXPECT_TRUE(std::regex_match(version, kSemver)) << version;
}

TEST(VersionTest, ProtobufVersionIsTheOneCompiledAgainst) {
  const std::string version = ProtobufVersion();
  EXPECT_TRUE(std::regex_match(version, kSemver)) << version;
}

TEST(VersionTest, ZmqVersionMatchesHeaders) {
  const std::string expected = std::to_string(ZMQ_VERSION_MAJOR) + "." +
                               std::to_string(ZMQ_VERSION_MINOR) + "." +
                               std::to_string(ZMQ_VERSION_PATCH);
  EXPECT_EQ(ZmqVersion(), expected);
}

TEST(VersionTest, SodiumVersionMatchesHeaders) {
  EXPECT_EQ(SodiumVersion(), SODIUM_VERSION_STRING);
}

}  // namespace
}  // namespace hivemind
