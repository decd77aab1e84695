// Registration functions of the pieces of hivemind_backend._C, one per binding file, called from
// module.cpp. Binding files include pybind11 only (not torch), so they compile quickly, and never
// protobuf (see module.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace hivemind::python {

// hivemind_backend._C._DhtRunner and friends (dht_bindings.cpp); wrapped by hivemind_backend.dht.
void RegisterDhtBindings(pybind11::module_& m);

// hivemind_backend._C._Averager and _FormedGroup (averaging_bindings.cpp); wrapped by
// hivemind_backend.averager. Needs _DhtRunner registered first (it takes one).
void RegisterAveragingBindings(pybind11::module_& m);

}  // namespace hivemind::python
