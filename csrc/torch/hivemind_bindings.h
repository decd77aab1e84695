// Registration functions of the pieces of hivemind_backend._C, one per binding file, called from
// module.cpp. Binding files include pybind11 only (not torch), so they compile quickly, and never
// protobuf (see module.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>
#include <string>

#include "common/status.h"

namespace hivemind::python {

// Shared by the binding files; defined in binding_errors.cpp.
//
// Sets the Python exception that matches a failed `status` (call with the GIL held): the codes
// that mean "your input" become ValueError with the message alone, timeouts TimeoutError,
// authentication failures PermissionError, everything else RuntimeError with the code name, so
// that Python code can tell bad arguments from network trouble.
void SetPythonError(const Status& status);
// Throws `status` as that Python exception; works with or without the GIL (a translator
// registered by RegisterErrorTranslation converts it at the Python boundary).
[[noreturn]] void Raise(const Status& status);
void RegisterErrorTranslation();
// Text from the network or the OS may not be valid UTF-8; this never raises for that.
pybind11::str SafeStr(const std::string& text);
// A positive (or, with allow_zero, non-negative) number of seconds; ValueError naming `name`.
std::chrono::milliseconds Millis(double seconds, const char* name, bool allow_zero = false);

// hivemind_backend._C._DhtRunner and friends (dht_bindings.cpp); wrapped by hivemind_backend.dht.
void RegisterDhtBindings(pybind11::module_& m);

// hivemind_backend._C._Averager and _FormedGroup (averaging_bindings.cpp); wrapped by
// hivemind_backend.averager. Needs _DhtRunner registered first (it takes one).
void RegisterAveragingBindings(pybind11::module_& m);

// hivemind_backend._C._StateSharer and friends (state_sharing_bindings.cpp); wrapped by
// hivemind_backend.state_sharing. Needs _DhtRunner registered first (it takes one).
void RegisterStateSharingBindings(pybind11::module_& m);

}  // namespace hivemind::python
