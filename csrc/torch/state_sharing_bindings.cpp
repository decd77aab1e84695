// Python bindings of state sharing: the native half of DecentralizedAverager's
// allow_state_sharing / get_current_state / load_state_from_peers (averager.py holds the
// user-facing API: what the state is, when it is snapshotted, the priority records and the order
// in which donors are tried). The transfer itself is csrc/averaging/state_*
// (docs/state_transfer.md).
//
// - _StateBuffer: the bytes of one tensor, exposed through the buffer protocol, so that torch
//   copies a tensor straight into a snapshot and a downloaded tensor is a view of the received
//   bytes: one copy on each side, none of them in Python.
// - _StateSnapshot: metadata and tensors being assembled for one Publish.
// - _StateSharer: one averager's StateDonor on its DHT peer's node, serving under a method name of
//   its own prefix (so averagers of one DHT with different prefixes each serve their own state).
// - _StateLoader: one newcomer's download, on a client-mode node of its own. DownloadState has no
//   cancel flag; shutting that node down fails every stream of the download at once, which is how
//   an averager's shutdown ends a download in progress without waiting for its timeouts.
//
// Only protobuf-free headers here (docs/building.md): state_donor.h, state_download.h and
// state_directory.h keep protobuf inside the core.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "averaging/state_directory.h"
#include "averaging/state_donor.h"
#include "averaging/state_download.h"
#include "averaging/state_snapshot.h"
#include "common/status.h"
#include "dht/dht_runner.h"
#include "net/node.h"
#include "torch/hivemind_bindings.h"

namespace py = pybind11;

namespace hivemind::python {
namespace {

using averaging::DownloadedState;
using averaging::StateDonor;
using averaging::StateDonorInfo;
using averaging::StateDonorOptions;
using averaging::StateDownloadOptions;
using averaging::StateDownloadProgress;
using averaging::StateSnapshot;
using averaging::StateTensor;
using dht::DhtRunner;

// The stream method of the donors under `prefix`. Every averager sharing state on one DHT peer
// registers on the same node, and a node has one handler per name.
std::string StateMethod(const std::string& prefix) {
  return std::string(averaging::kStateTransferMethod) + "/" + prefix;
}

// Bytes with shared ownership, writable through the buffer protocol. Python writes a snapshot's
// bytes before it is published and never after (published bytes are sent zero-copy); downloaded
// bytes belong to the newcomer alone.
struct StateBuffer {
  net::Payload payload;
};

class StateSnapshotBuilder {
 public:
  explicit StateSnapshotBuilder(std::string metadata) { snapshot_.metadata = std::move(metadata); }

  // Appends a tensor of `size` uninitialized bytes and returns them for the caller to fill.
  StateBuffer AddTensor(std::string name, std::string dtype, std::vector<int64_t> shape,
                        size_t size) {
    if (taken_) Raise(Status(StatusCode::kFailedPrecondition, "this snapshot is published"));
    for (int64_t dim : shape) {
      if (dim < 0) {
        Raise(Status(StatusCode::kInvalidArgument,
                     "tensor dimensions must be >= 0, got " + std::to_string(dim)));
      }
    }
    net::Payload payload = net::Payload::Allocate(size);
    snapshot_.tensors.push_back(
        StateTensor{std::move(name), std::move(dtype), std::move(shape), payload});
    return StateBuffer{payload};
  }

  StateSnapshot Take() {
    if (taken_) Raise(Status(StatusCode::kFailedPrecondition, "this snapshot is published"));
    taken_ = true;
    return std::move(snapshot_);
  }

  uint64_t total_bytes() const { return snapshot_.TotalBytes(); }

 private:
  StateSnapshot snapshot_;
  bool taken_ = false;
};

// (runner, prefix) pairs that have a sharer: the DHT advert's subkey is the runner's owner marker
// and the stream method is the prefix's, so a second sharer would silently replace the first.
std::mutex g_slots_mutex;
std::set<std::pair<const DhtRunner*, std::string>> g_slots;

uint64_t NowMillis() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

class StateSharer {
 public:
  StateSharer(std::shared_ptr<DhtRunner> runner, std::string prefix, size_t chunk_bytes,
              int max_concurrent_downloads)
      : runner_(std::move(runner)), prefix_(std::move(prefix)) {
    if (!runner_ || !runner_->is_running()) {
      Raise(Status(StatusCode::kFailedPrecondition, "the DHT is not running"));
    }
    if (runner_->client_mode()) {
      Raise(Status(StatusCode::kInvalidArgument,
                   "a client-mode DHT peer cannot share state: nobody can connect to it"));
    }
    {
      std::lock_guard<std::mutex> lock(g_slots_mutex);
      if (!g_slots.emplace(runner_.get(), prefix_).second) {
        Raise(Status(StatusCode::kInvalidArgument,
                     "another averager of this DHT already shares its state under prefix '" +
                         prefix_ + "' (one donor per DHT peer and prefix)"));
      }
    }
    StateDonorOptions options;
    options.method = StateMethod(prefix_);
    options.chunk_bytes = chunk_bytes;
    options.max_concurrent_downloads = max_concurrent_downloads;
    auto donor = StateDonor::Create(runner_->node(), std::move(options));
    if (!donor.ok()) {
      ReleaseSlot();
      Raise(donor.status());
    }
    donor_ = std::move(donor).value();
  }

  ~StateSharer() { Stop(); }

  StateSharer(const StateSharer&) = delete;
  StateSharer& operator=(const StateSharer&) = delete;

  // Publishes the snapshot (checksums computed here, without the GIL) and returns its version:
  // the wall-clock time in milliseconds, or one above the previous version when the clock has
  // not moved on. It tells newcomers how fresh a donor's state is; downloads that lose their donor
  // continue with another donor holding the same (version, content), or start over.
  uint64_t Publish(StateSnapshotBuilder& builder) {
    StateSnapshot snapshot = builder.Take();
    std::shared_ptr<StateDonor> donor = Donor();
    Status published;
    uint64_t version = 0;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(publish_mutex_);
      version = std::max(donor->version() + 1, NowMillis());
      published = donor->Publish(std::move(snapshot), version);
    }
    if (!published.ok()) Raise(published);
    return version;
  }

  // One refresh of this donor's entry under "<prefix>.state", expiring `ttl` seconds from now.
  void Advertise(double ttl) {
    if (!std::isfinite(ttl) || ttl < 1) {
      Raise(Status(StatusCode::kInvalidArgument, "advert ttl must be at least 1 s"));
    }
    std::shared_ptr<StateDonor> donor = Donor();
    Status advertised;
    {
      py::gil_scoped_release release;
      advertised = donor->Advertise(*runner_, prefix_,
                                    std::chrono::seconds(static_cast<int64_t>(std::ceil(ttl))));
    }
    if (!advertised.ok()) Raise(advertised);
  }

  // The donor stops serving: downloads starting from now on are refused with UNAVAILABLE, and
  // those in progress stop at their next chunk (their newcomers go on with another donor). A
  // Publish running on another thread keeps the donor alive until it returns. Idempotent.
  void Stop() {
    std::shared_ptr<StateDonor> donor;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      donor = std::move(donor_);
    }
    if (donor) ReleaseSlot();
  }

  uint64_t version() const {
    std::shared_ptr<StateDonor> donor = Peek();
    return donor ? donor->version() : 0;
  }

  int active_downloads() const {
    std::shared_ptr<StateDonor> donor = Peek();
    return donor ? donor->active_downloads() : 0;
  }

  bool stopped() const { return Peek() == nullptr; }

 private:
  std::shared_ptr<StateDonor> Peek() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return donor_;
  }

  std::shared_ptr<StateDonor> Donor() const {
    std::shared_ptr<StateDonor> donor = Peek();
    if (!donor) Raise(Status(StatusCode::kFailedPrecondition, "state sharing is stopped"));
    return donor;
  }

  void ReleaseSlot() {
    std::lock_guard<std::mutex> lock(g_slots_mutex);
    g_slots.erase({runner_.get(), prefix_});
  }

  // Declared first, destroyed last: the donor's handler lives on the runner's node.
  std::shared_ptr<DhtRunner> runner_;
  const std::string prefix_;
  mutable std::mutex mutex_;  // guards donor_
  std::shared_ptr<StateDonor> donor_;
  std::mutex publish_mutex_;  // versions are chosen and published in one order
};

// The donors advertising under `prefix`, as FindStateDonors lists them. Blocks without the GIL.
std::vector<StateDonorInfo> FindDonors(const std::shared_ptr<DhtRunner>& runner,
                                       const std::string& prefix) {
  if (!runner || !runner->is_running()) {
    Raise(Status(StatusCode::kFailedPrecondition, "the DHT is not running"));
  }
  Result<std::vector<StateDonorInfo>> donors = Status();
  {
    py::gil_scoped_release release;
    donors = averaging::FindStateDonors(*runner, prefix);
  }
  if (!donors.ok()) Raise(donors.status());
  return std::move(donors).value();
}

py::dict AttemptToDict(const averaging::StateDonorAttempt& attempt) {
  py::dict out;
  out["peer_id"] = attempt.peer.ToString();
  out["version"] = attempt.version;
  out["start_offset"] = attempt.start_offset;
  out["bytes_received"] = attempt.bytes_received;
  out["bytes_verified"] = attempt.bytes_verified;
  out["status"] = SafeStr(attempt.status.ToString());
  out["ok"] = attempt.status.ok();
  return out;
}

class StateLoader {
 public:
  StateLoader(std::string prefix, bool encryption) : prefix_(std::move(prefix)) {
    net::NodeOptions options;
    // It only dials donors: nothing to listen on, and nobody needs to reach it first.
    options.client_mode = true;
    options.listen_addresses = {};
    options.encryption = encryption;
    Result<std::unique_ptr<net::Node>> node = Status();
    {
      py::gil_scoped_release release;
      node = net::Node::Start(std::move(options));
    }
    if (!node.ok()) Raise(node.status().WithContext("cannot start the download's node"));
    node_ = std::move(node).value();
  }

  ~StateLoader() { Close(); }

  StateLoader(const StateLoader&) = delete;
  StateLoader& operator=(const StateLoader&) = delete;

  // Downloads from `donors`, tried in the given order; returns the state as a dict, or raises
  // (RuntimeError naming every donor tried and why it failed, TimeoutError past `timeout`).
  // `on_progress(donor peer id, verified bytes, total bytes)` runs after each verified chunk.
  py::dict Download(std::vector<StateDonorInfo> donors, double timeout, double message_timeout,
                    int max_restarts, const py::object& on_progress) {
    StateDownloadOptions options;
    options.method = StateMethod(prefix_);
    options.timeout = Millis(timeout, "timeout");
    options.message_timeout = Millis(message_timeout, "message_timeout");
    options.max_restarts = std::max(0, max_restarts);
    if (!on_progress.is_none()) {
      // Captures the object by reference: it is destroyed here, with the GIL, not on the
      // download's thread.
      options.on_progress = [&on_progress](const StateDownloadProgress& progress) {
        py::gil_scoped_acquire gil;
        try {
          on_progress(progress.donor.ToString(), progress.verified_bytes, progress.total_bytes);
        } catch (py::error_already_set& error) {
          // A progress callback must not break the download; its error is reported, not raised.
          error.discard_as_unraisable("hivemind_backend state download on_progress");
        } catch (const std::exception& error) {  // e.g. a pybind11 cast error
          PyErr_SetString(PyExc_RuntimeError, error.what());
          py::error_already_set().discard_as_unraisable(
              "hivemind_backend state download on_progress");
        }
      };
    }
    Result<DownloadedState> downloaded = Status();
    {
      py::gil_scoped_release release;
      if (cancelled_.load()) {
        downloaded = Status(StatusCode::kCancelled, "the download was cancelled");
      } else {
        downloaded = averaging::DownloadState(*node_, std::move(donors), options);
      }
    }
    if (!downloaded.ok()) Raise(downloaded.status());
    return ToDict(std::move(downloaded).value());
  }

  // Fails the download in progress (and every later one) at once. Thread-safe, idempotent.
  void Cancel() {
    cancelled_.store(true);
    node_->Shutdown();
  }

  void Close() {
    if (node_) node_->Shutdown();
  }

 private:
  static py::dict ToDict(DownloadedState state) {
    py::list tensors;
    for (auto& tensor : state.snapshot.tensors) {
      tensors.append(py::make_tuple(SafeStr(tensor.name), SafeStr(tensor.dtype),
                                    py::cast(tensor.shape), StateBuffer{std::move(tensor.data)}));
    }
    py::list attempts;
    std::string donor;
    for (const auto& attempt : state.attempts) {
      attempts.append(AttemptToDict(attempt));
      if (attempt.status.ok()) donor = attempt.peer.ToString();
    }
    py::dict out;
    out["metadata"] = py::bytes(state.snapshot.metadata);
    out["tensors"] = tensors;
    out["version"] = state.version;
    out["digest"] = py::bytes(state.digest);
    out["donor"] = donor;
    out["attempts"] = attempts;
    out["bytes_received"] = state.bytes_received;
    out["total_bytes"] = state.snapshot.TotalBytes();
    out["restarts"] = state.restarts;
    return out;
  }

  const std::string prefix_;
  std::unique_ptr<net::Node> node_;
  std::atomic<bool> cancelled_{false};
};

}  // namespace

void RegisterStateSharingBindings(py::module_& m) {
  py::class_<StateBuffer>(m, "_StateBuffer", py::buffer_protocol(),
                          "Bytes of one shared tensor (buffer protocol, writable).")
      .def_buffer([](StateBuffer& buffer) {
        return py::buffer_info(buffer.payload.mutable_data(), 1,
                               py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(buffer.payload.size())}, {1},
                               /*readonly=*/false);
      })
      .def("__len__", [](const StateBuffer& buffer) { return buffer.payload.size(); });

  py::class_<StateSnapshotBuilder>(m, "_StateSnapshot",
                                   "A state being assembled for _StateSharer.publish().")
      .def(py::init([](py::bytes metadata) {
             return std::make_unique<StateSnapshotBuilder>(std::string(metadata));
           }),
           py::arg("metadata"))
      .def("add_tensor", &StateSnapshotBuilder::AddTensor, py::arg("name"), py::arg("dtype"),
           py::arg("shape"), py::arg("size"),
           "Appends a tensor of `size` bytes and returns its buffer, for the caller to fill "
           "before publishing.")
      .def_property_readonly("total_bytes", &StateSnapshotBuilder::total_bytes);

  py::class_<StateDonorInfo>(m, "_StateDonorInfo", "A state donor as advertised in the DHT.")
      .def_property_readonly("peer_id",
                             [](const StateDonorInfo& d) { return d.address.peer_id.ToString(); })
      .def_property_readonly("version", [](const StateDonorInfo& d) { return d.version; })
      .def_property_readonly("total_bytes", [](const StateDonorInfo& d) { return d.total_bytes; })
      .def_property_readonly("active_downloads",
                             [](const StateDonorInfo& d) { return d.active_downloads; })
      .def("__repr__", [](const StateDonorInfo& d) {
        return "<_StateDonorInfo " + d.address.peer_id.ToString() + " version " +
               std::to_string(d.version) + ">";
      });

  py::class_<StateSharer>(m, "_StateSharer",
                          "Native state donor of one averager. Use DecentralizedAverager.")
      .def(py::init([](std::shared_ptr<DhtRunner> runner, std::string prefix, size_t chunk_bytes,
                       int max_concurrent_downloads) {
             return std::make_unique<StateSharer>(std::move(runner), std::move(prefix), chunk_bytes,
                                                  max_concurrent_downloads);
           }),
           py::kw_only(), py::arg("runner"), py::arg("prefix"), py::arg("chunk_bytes"),
           py::arg("max_concurrent_downloads"))
      .def("publish", &StateSharer::Publish, py::arg("snapshot"),
           "Makes the snapshot the state served from now on; returns its version.")
      .def("advertise", &StateSharer::Advertise, py::arg("ttl"),
           "Refreshes this donor's entry in the DHT (\"<prefix>.state\").")
      .def("stop", &StateSharer::Stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("version", &StateSharer::version)
      .def_property_readonly("active_downloads", &StateSharer::active_downloads)
      .def_property_readonly("stopped", &StateSharer::stopped);

  py::class_<StateLoader>(m, "_StateLoader",
                          "One state download on a node of its own. Use "
                          "DecentralizedAverager.load_state_from_peers.")
      .def(py::init<std::string, bool>(), py::kw_only(), py::arg("prefix"), py::arg("encryption"))
      .def("download", &StateLoader::Download, py::arg("donors"), py::arg("timeout"),
           py::arg("message_timeout"), py::arg("max_restarts"), py::arg("on_progress") = py::none())
      .def("cancel", &StateLoader::Cancel, py::call_guard<py::gil_scoped_release>())
      .def("close", &StateLoader::Close, py::call_guard<py::gil_scoped_release>());

  m.def("_find_state_donors", &FindDonors, py::arg("runner"), py::arg("prefix"),
        "The donors advertising state under `prefix` (newest version first, then least loaded).");
}

}  // namespace hivemind::python
