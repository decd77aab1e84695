// Errors and argument conversions shared by the binding files (declared in hivemind_bindings.h).
#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>

#include "torch/hivemind_bindings.h"

namespace py = pybind11;

namespace hivemind::python {
namespace {

// A failed Status crossing into Python; translated (with the GIL held) by the translator below,
// so it may be thrown with or without the GIL.
class StatusError : public std::exception {
 public:
  explicit StatusError(Status status) : status_(std::move(status)), text_(status_.ToString()) {}
  const char* what() const noexcept override { return text_.c_str(); }
  const Status& status() const { return status_; }

 private:
  Status status_;
  std::string text_;
};

void TranslateStatusError(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const StatusError& e) {
    SetPythonError(e.status());
  }
}

}  // namespace

void SetPythonError(const Status& status) {
  PyObject* type = PyExc_RuntimeError;
  std::string text = status.ToString();
  switch (status.code()) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kResourceExhausted:
      // The caller's input: the message names the cause, the code would only add noise.
      type = PyExc_ValueError;
      text = status.message();
      break;
    case StatusCode::kDeadlineExceeded:
      type = PyExc_TimeoutError;
      break;
    case StatusCode::kPermissionDenied:
      type = PyExc_PermissionError;
      break;
    default:
      break;
  }
  PyErr_SetString(type, text.c_str());
}

void RegisterErrorTranslation() { py::register_exception_translator(&TranslateStatusError); }

[[noreturn]] void Raise(const Status& status) { throw StatusError(status); }

py::str SafeStr(const std::string& text) {
  PyObject* decoded =
      PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace");
  if (decoded == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(decoded);
}

std::chrono::milliseconds Millis(double seconds, const char* name, bool allow_zero) {
  if (!std::isfinite(seconds) || seconds < 0 || (!allow_zero && seconds == 0)) {
    Raise(Status(StatusCode::kInvalidArgument,
                 std::string(name) + " must be a " + (allow_zero ? "non-negative" : "positive") +
                     " number of seconds, got " + std::to_string(seconds)));
  }
  return std::chrono::milliseconds(static_cast<int64_t>(std::ceil(seconds * 1000)));
}

}  // namespace hivemind::python
