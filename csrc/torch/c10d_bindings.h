// Registration of the c10d backend's bindings (c10d_bindings.cpp), called from module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace hivemind::python {

// hivemind_backend._C._ProcessGroupHivemind, _BackendConfig, _shutdown_swarm_peer.
// torch.distributed must be imported before the module loads (the class derives from its Backend).
void RegisterC10dBindings(pybind11::module_& m);

}  // namespace hivemind::python
