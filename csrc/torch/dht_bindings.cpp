// Python bindings of dht::DhtRunner: the low-level half of hivemind_backend.DHT (dht.py holds the
// user-facing API and the value encoding). Blocking calls release the GIL, so Python threads can
// store and get concurrently and the interpreter keeps running while the network works.
//
// Only protobuf-free headers here: dht/dht_runner.h keeps protobuf inside the core.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "dht/dht_runner.h"
#include "torch/hivemind_bindings.h"

namespace py = pybind11;

namespace hivemind::python {
namespace {

using dht::DhtRunner;
using dht::DhtRunnerOptions;

std::shared_ptr<DhtRunner> StartRunner(
    std::vector<std::string> initial_peers, std::vector<std::string> host_maddrs,
    std::vector<std::string> announce_maddrs, std::string identity_path, bool client_mode,
    bool encryption, double wait_timeout, double bootstrap_timeout, bool ensure_bootstrap_success,
    double maintenance_period, double bootstrap_retry_period, size_t num_replicas,
    size_t bucket_size, int depth_modulo, size_t num_workers, bool cache_locally,
    size_t cache_nearest, double cache_refresh_before_expiry, double blacklist_time,
    double backoff_rate, double refresh_timeout) {
  DhtRunnerOptions options;
  options.initial_peers = std::move(initial_peers);
  options.listen_addresses = std::move(host_maddrs);
  options.announce_addresses = std::move(announce_maddrs);
  options.identity_path = std::move(identity_path);
  options.client_mode = client_mode;
  options.encryption = encryption;
  options.call_timeout = Millis(wait_timeout, "wait_timeout");
  options.bootstrap_timeout = Millis(bootstrap_timeout, "bootstrap_timeout");
  options.ensure_bootstrap_success = ensure_bootstrap_success;
  options.maintenance_period = Millis(maintenance_period, "maintenance_period");
  options.bootstrap_retry_seconds = bootstrap_retry_period;
  options.num_replicas = num_replicas;
  options.bucket_size = bucket_size;
  options.depth_modulo = depth_modulo;
  options.parallelism = num_workers;
  options.cache_locally = cache_locally;
  options.cache_nearest = cache_nearest;
  options.cache_refresh_before_expiry = cache_refresh_before_expiry;
  options.blacklist_time = blacklist_time;
  options.backoff_rate = backoff_rate;
  options.bucket_refresh_seconds = refresh_timeout;
  auto runner = DhtRunner::Start(std::move(options));
  if (!runner.ok()) Raise(runner.status());
  return std::shared_ptr<DhtRunner>(std::move(runner).value());
}

// (accepted, status code name, message, replicas). Input errors raise instead.
py::tuple Store(DhtRunner& runner, std::string key, std::string value, double expiration,
                std::optional<std::string> subkey) {
  Result<dht::DhtRunnerStoreResult> result = Status();
  {
    py::gil_scoped_release release;
    result = runner.Store(std::move(key), std::move(value), expiration, std::move(subkey));
  }
  if (!result.ok()) Raise(result.status());
  const Status& status = result->status;
  return py::make_tuple(status.ok(), StatusCodeName(status.code()), SafeStr(status.message()),
                        result->replicas);
}

// None, or (regular: (bytes, expiration) | None, dictionary: {subkey bytes: (bytes, expiration)}).
py::object Get(DhtRunner& runner, std::string key, bool latest) {
  Result<std::optional<dht::DhtRunnerValue>> result = Status();
  {
    py::gil_scoped_release release;
    result = runner.Get(std::move(key), latest);
  }
  if (!result.ok()) Raise(result.status());
  if (!result.value()) return py::none();
  const dht::DhtRunnerValue& value = *result.value();
  py::object regular = py::none();
  if (value.regular) {
    regular = py::make_tuple(py::bytes(value.regular->value), value.regular->expiration);
  }
  py::dict dictionary;
  for (const auto& [subkey, entry] : value.dictionary) {
    dictionary[py::bytes(subkey)] = py::make_tuple(py::bytes(entry.value), entry.expiration);
  }
  return py::make_tuple(regular, dictionary);
}

py::dict Stats(const DhtRunner& runner) {
  const dht::DhtRunnerStats stats = runner.Stats();
  py::dict out;
  out["routing_table_size"] = stats.routing_table_size;
  out["stored_keys"] = stats.stored_keys;
  out["cached_keys"] = stats.cached_keys;
  out["blacklisted"] = stats.blacklisted;
  out["bootstrapped"] = stats.bootstrapped;
  out["bootstrap_error"] = SafeStr(stats.bootstrap_error);
  return out;
}

}  // namespace

void RegisterDhtBindings(py::module_& m) {
  RegisterErrorTranslation();

  py::class_<DhtRunner, std::shared_ptr<DhtRunner>>(
      m, "_DhtRunner",
      "A running DHT peer (C++ dht::DhtRunner). Use hivemind_backend.DHT instead of this.")
      .def_property_readonly("peer_id", &DhtRunner::peer_id)
      .def_property_readonly("visible_addresses", &DhtRunner::visible_addresses)
      .def_property_readonly("owner_marker", &DhtRunner::owner_marker)
      .def_property_readonly("client_mode", &DhtRunner::client_mode)
      .def_property_readonly("is_running", &DhtRunner::is_running)
      .def("stats", &Stats)
      .def("store", &Store, py::arg("key"), py::arg("value"), py::arg("expiration"),
           py::arg("subkey") = py::none())
      .def("get", &Get, py::arg("key"), py::arg("latest") = false)
      .def("shutdown", &DhtRunner::Shutdown, py::call_guard<py::gil_scoped_release>());

  m.def("_dht_start", &StartRunner, py::call_guard<py::gil_scoped_release>(),
        "Starts a DHT peer; blocks (without the GIL) until bootstrap ends.", py::kw_only(),
        py::arg("initial_peers"), py::arg("host_maddrs"), py::arg("announce_maddrs"),
        py::arg("identity_path"), py::arg("client_mode"), py::arg("encryption"),
        py::arg("wait_timeout"), py::arg("bootstrap_timeout"), py::arg("ensure_bootstrap_success"),
        py::arg("maintenance_period"), py::arg("bootstrap_retry_period"), py::arg("num_replicas"),
        py::arg("bucket_size"), py::arg("depth_modulo"), py::arg("num_workers"),
        py::arg("cache_locally"), py::arg("cache_nearest"), py::arg("cache_refresh_before_expiry"),
        py::arg("blacklist_time"), py::arg("backoff_rate"), py::arg("refresh_timeout"));
  m.def("_dht_time", &dht::DhtNow, "Seconds since the Unix epoch, the DHT's clock.");
}

}  // namespace hivemind::python
