#pragma once

#include <string>

namespace hivemind {

// Version of this project, e.g. "0.1.0". The single source is the top-level VERSION file: CMake
// passes it to version.cpp and setup.py reads the same file for the Python package.
const char* Version();

// Version of the protobuf headers the core was compiled against, e.g. "3.21.12" on Debian 12.
// It lives in the core, not in csrc/torch/, because torch's include directory ships its own
// (older) protobuf headers that would shadow Debian's there; see docs/building.md.
std::string ProtobufVersion();

// Version of the libzmq loaded at run time, e.g. "4.3.4".
std::string ZmqVersion();

// Version of the libsodium loaded at run time, e.g. "1.0.18".
std::string SodiumVersion();

}  // namespace hivemind
