#include "common/version.h"

#include <google/protobuf/stubs/common.h>
#include <sodium.h>
#include <zmq.h>

#ifndef HIVEMIND_VERSION
#error "HIVEMIND_VERSION must be defined by the build (it comes from the top-level VERSION file)"
#endif

namespace hivemind {

const char* Version() { return HIVEMIND_VERSION; }

std::string ProtobufVersion() {
  return google::protobuf::internal::VersionString(GOOGLE_PROTOBUF_VERSION);
}

std::string ZmqVersion() {
  int major = 0;
  int minor = 0;
  int patch = 0;
  zmq_version(&major, &minor, &patch);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

std::string SodiumVersion() { return sodium_version_string(); }

}  // namespace hivemind
