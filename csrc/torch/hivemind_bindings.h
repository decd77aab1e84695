// Registration functions of the pieces of hivemind_backend._C, one per binding file, called from
// module.cpp. Binding files include pybind11 only (not torch), so they compile quickly, and never
// protobuf (see module.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include "common/status.h"

namespace hivemind::python {

// Sets the Python exception that matches a failed `status` (call with the GIL held): the codes
// that mean "your input" become ValueError with the message alone, timeouts TimeoutError,
// authentication failures PermissionError, everything else RuntimeError with the code name, so
// that Python code can tell bad arguments from network trouble. Defined in dht_bindings.cpp.
void SetPythonError(const Status& status);

// hivemind_backend._C._DhtRunner and friends (dht_bindings.cpp); wrapped by hivemind_backend.dht.
void RegisterDhtBindings(pybind11::module_& m);

// hivemind_backend._C._Averager and _FormedGroup (averaging_bindings.cpp); wrapped by
// hivemind_backend.averager. Needs _DhtRunner registered first (it takes one).
void RegisterAveragingBindings(pybind11::module_& m);

}  // namespace hivemind::python
