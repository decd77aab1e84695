// hivemind_backend._C._ProcessGroupHivemind and _BackendConfig: the native half of
// hivemind_backend/c10d.py, which registers the backend with torch.distributed.
#include "torch/c10d_bindings.h"

#include <pybind11/chrono.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/python.h>

#include "swarm/swarm_peer.h"
#include "torch/c10d_backend.h"

namespace py = pybind11;

namespace hivemind::python {

void RegisterC10dBindings(py::module_& m) {
  using c10d_backend::BackendConfig;
  using c10d_backend::HivemindBackend;

  py::class_<BackendConfig>(m, "_BackendConfig")
      .def(py::init<>())
      .def_readwrite("initial_peers", &BackendConfig::initial_peers)
      .def_readwrite("run_id", &BackendConfig::run_id)
      .def_readwrite("host_maddrs", &BackendConfig::host_maddrs)
      .def_readwrite("announce_maddrs", &BackendConfig::announce_maddrs)
      .def_readwrite("identity_path", &BackendConfig::identity_path)
      .def_readwrite("encryption", &BackendConfig::encryption)
      .def_readwrite("join_swarm", &BackendConfig::join_swarm)
      .def_readwrite("min_group_size", &BackendConfig::min_group_size)
      .def_readwrite("target_group_size", &BackendConfig::target_group_size)
      .def_readwrite("moshpit_dims", &BackendConfig::moshpit_dims)
      .def_readwrite("moshpit_period", &BackendConfig::moshpit_period)
      .def_readwrite("matchmaking_time", &BackendConfig::matchmaking_time)
      .def_readwrite("request_timeout", &BackendConfig::request_timeout)
      .def_readwrite("bootstrap_timeout", &BackendConfig::bootstrap_timeout)
      .def_readwrite("compression", &BackendConfig::compression);

  py::class_<HivemindBackend, c10d::Backend, c10::intrusive_ptr<HivemindBackend>>(
      m, "_ProcessGroupHivemind")
      .def(py::init([](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                       std::chrono::milliseconds timeout, const BackendConfig& config) {
             return c10::make_intrusive<HivemindBackend>(store, rank, size, timeout, config);
           }),
           py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("timeout"),
           py::arg("config"),
           // Creation waits on the store for the other ranks: let other Python threads run.
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("peer_address", &HivemindBackend::peer_address)
      .def_property_readonly("launch_id", &HivemindBackend::launch_id)
      .def_property_readonly("swarm_group_size", &HivemindBackend::swarm_group_size)
      .def_property_readonly("group_generation", &HivemindBackend::group_generation)
      .def_property_readonly("established", &HivemindBackend::established)
      .def("swarm_is_running", &HivemindBackend::swarm_is_running,
           py::call_guard<py::gil_scoped_release>())
      .def("set_joining", &HivemindBackend::set_joining)
      .def("sync_state", &HivemindBackend::sync_state, py::arg("tensors"));

  m.def(
      "_shutdown_swarm_peer",
      [] {
        if (auto peer = swarm::SwarmPeer::Current()) peer->Shutdown();
      },
      py::call_guard<py::gil_scoped_release>(),
      "Stops this process's swarm peer (at interpreter exit: no network thread outlives Python).");
}

}  // namespace hivemind::python
