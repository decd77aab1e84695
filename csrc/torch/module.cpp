// The Python extension module hivemind_backend._C.
//
// csrc/torch/ is the only folder that includes torch headers. It must not include protobuf headers
// (nor proto/*.pb.h): torch/include ships protobuf 3.13 headers that shadow Debian's 3.21 ones in
// this target. Protobuf stays inside hivemind_core; see docs/building.md.
#include <torch/python.h>

#include <string>

#include "common/version.h"
#include "torch/c10d_bindings.h"
#include "torch/hivemind_bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hivemind_backend native core: a PyTorch c10d backend over ZeroMQ";
  m.def(
      "version", [] { return std::string(hivemind::Version()); },
      "Version of the native core (from the VERSION file).");
  m.def("protobuf_version", &hivemind::ProtobufVersion,
        "Version of the protobuf headers the core was compiled against.");
  m.def("zmq_version", &hivemind::ZmqVersion, "Version of the libzmq loaded in this process.");
  m.def("sodium_version", &hivemind::SodiumVersion,
        "Version of the libsodium loaded in this process.");
  hivemind::python::RegisterDhtBindings(m);
  hivemind::python::RegisterAveragingBindings(m);
  hivemind::python::RegisterStateSharingBindings(m);
  hivemind::python::RegisterC10dBindings(m);
}
