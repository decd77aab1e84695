// Python bindings of decentralized averaging: the native half of
// hivemind_backend.DecentralizedAverager (averager.py holds the user-facing API, the tensor
// flattening, the lock and the retry loop).
//
// One step is two calls, form_group() then all_reduce(), rather than one: the Python side takes
// the tensor lock only once a group exists, so user code can keep writing to the tensors while
// matchmaking waits (hundreds of milliseconds to seconds) and is blocked only for the all-reduce.
//
// Only protobuf-free headers here (docs/building.md): matchmaking.h and allreduce.h keep protobuf
// inside the core.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "averaging/allreduce.h"
#include "averaging/codec.h"
#include "averaging/codec_policy.h"
#include "averaging/group.h"
#include "averaging/group_key.h"
#include "averaging/matchmaking.h"
#include "averaging/part_codec.h"
#include "common/status.h"
#include "dht/dht_runner.h"
#include "torch/hivemind_bindings.h"

namespace py = pybind11;

namespace hivemind::python {
namespace {

using averaging::AllReduceOptions;
using averaging::AllReduceReport;
using averaging::AllReduceService;
using averaging::CodecId;
using averaging::CodecRange;
using averaging::CodecSpec;
using averaging::FormedGroup;
using averaging::GroupKeyManager;
using averaging::GroupKeyOptions;
using averaging::Matchmaker;
using averaging::MatchmakingOptions;
using averaging::MemberMode;
using averaging::SharedMean;
using dht::DhtRunner;

MemberMode ParseMode(const std::string& mode) {
  if (mode == "normal") return MemberMode::kNormal;
  if (mode == "client") return MemberMode::kClient;
  if (mode == "auxiliary") return MemberMode::kAuxiliary;
  Raise(Status(StatusCode::kInvalidArgument,
               "mode must be 'normal', 'client' or 'auxiliary', got '" + mode + "'"));
}

// A codec as Python names it: hivemind's CompressionType number (what CodecId follows) and a block
// size, 0 meaning the codec's default. The default is written out so that "0" and "4096" give the
// same range digest: peers that spell the default differently still average together.
CodecSpec ParseCodecSpec(int64_t codec_id, int64_t block_size) {
  if (codec_id < 0 || codec_id > std::numeric_limits<uint8_t>::max()) {
    Raise(Status(StatusCode::kInvalidArgument, "unknown codec id " + std::to_string(codec_id)));
  }
  if (block_size < 0 || block_size > std::numeric_limits<uint32_t>::max()) {
    Raise(Status(StatusCode::kInvalidArgument,
                 "codec block size must be in [0, 2^32), got " + std::to_string(block_size)));
  }
  CodecSpec spec{static_cast<CodecId>(codec_id), static_cast<uint32_t>(block_size)};
  Status valid = averaging::ValidateSpec(spec);
  if (!valid.ok()) Raise(valid);
  if (spec.block_size == 0 &&
      (spec.id == CodecId::kScaledFloat16 || spec.id == CodecId::kBlockwise8)) {
    spec.block_size = averaging::kDefaultBlockSize;
  }
  return spec;
}

averaging::DType ParseDType(const std::string& dtype) {
  if (dtype == "float32") return averaging::DType::kFloat32;
  if (dtype == "float64") return averaging::DType::kFloat64;
  if (dtype == "float16") return averaging::DType::kFloat16;
  if (dtype == "bfloat16") return averaging::DType::kBFloat16;
  Raise(Status(StatusCode::kInvalidArgument,
               "dtype must be 'float32', 'float64', 'float16' or 'bfloat16', got '" + dtype + "'"));
}

// (begin, size, codec id, block size) per range, in elements of the flat float32 vector. Checked
// here (signs, codecs, order, overlap) so that a bad list fails when the averager is made, before
// any group waits on this peer; the all-reduce checks the ranges against the vector's length again.
using CodecRangeTuple = std::tuple<int64_t, int64_t, int64_t, int64_t>;

std::vector<CodecRange> ParseCodecRanges(const std::vector<CodecRangeTuple>& tuples) {
  std::vector<CodecRange> ranges;
  ranges.reserve(tuples.size());
  for (size_t i = 0; i < tuples.size(); ++i) {
    const auto& [begin, size, codec_id, block_size] = tuples[i];
    if (begin < 0 || size < 0) {
      Raise(Status(StatusCode::kInvalidArgument,
                   "codecs[" + std::to_string(i) + "]: begin and size must be >= 0, got (" +
                       std::to_string(begin) + ", " + std::to_string(size) + ")"));
    }
    CodecRange range;
    range.begin = static_cast<size_t>(begin);
    range.size = static_cast<size_t>(size);
    range.spec = ParseCodecSpec(codec_id, block_size);
    ranges.push_back(range);
  }
  // The vector's length is not known yet: checking against the largest one still catches
  // unsorted and overlapping ranges (begin + size of two int64 values cannot overflow size_t).
  auto checked = averaging::PartCodec::Make(ranges, std::numeric_limits<size_t>::max());
  if (!checked.ok()) Raise(checked.status().WithContext("codecs"));
  return ranges;
}

// The codec a tensor of `dtype` with `num_elements` elements travels with when the user asked for
// `codec_id` on every tensor: the same rule as everywhere else in the backend (ChooseCodec: small
// tensors and 16-bit codecs on 16-bit tensors stay raw). Returns the codec id.
int ChooseTensorCodec(int64_t codec_id, int64_t num_elements, const std::string& dtype) {
  if (num_elements < 0) {
    Raise(Status(StatusCode::kInvalidArgument,
                 "num_elements must be >= 0, got " + std::to_string(num_elements)));
  }
  const CodecSpec requested = ParseCodecSpec(codec_id, 0);
  const CodecSpec chosen = averaging::ChooseCodec(
      static_cast<uint64_t>(num_elements), averaging::TensorRole::kUnspecified,
      averaging::CodecPolicy::AllRoles(requested), ParseDType(dtype));
  return static_cast<int>(chosen.id);
}

// The Matchmaker and AllReduceService of one DhtRunner. Both register fixed method names on the
// runner's node (a second instance would silently take the handlers over from the first), so all
// averagers of one DHT share them: the Matchmaker runs concurrent searches under different keys
// and the service runs concurrent rounds under different group ids.
struct PeerServices {
  // Declared first, destroyed last: the services must go before the node they serve on.
  std::shared_ptr<DhtRunner> runner;
  std::unique_ptr<Matchmaker> matchmaker;
  std::unique_ptr<AllReduceService> allreduce;
  int averagers = 0;  // live averagers using these services; guarded by g_services_mutex
};

std::mutex g_services_mutex;
// Entries exist while at least one averager of that runner is alive. In-flight calls hold their
// own reference, so an entry can be erased while a step of a shut-down averager still runs.
std::map<const DhtRunner*, std::shared_ptr<PeerServices>> g_services;

std::shared_ptr<PeerServices> AcquireServices(const std::shared_ptr<DhtRunner>& runner) {
  std::lock_guard<std::mutex> lock(g_services_mutex);
  auto& entry = g_services[runner.get()];
  if (!entry) {
    entry = std::make_shared<PeerServices>();
    entry->runner = runner;
    entry->matchmaker = std::make_unique<Matchmaker>(*runner);
    entry->allreduce = std::make_unique<AllReduceService>(runner->node());
  }
  ++entry->averagers;
  return entry;
}

void ReleaseServices(const std::shared_ptr<PeerServices>& services) {
  std::lock_guard<std::mutex> lock(g_services_mutex);
  if (--services->averagers > 0) return;
  g_services.erase(services->runner.get());
  // No averager is left on this runner: end its searches now rather than at their timeouts.
  services->matchmaker->Shutdown();
}

struct AveragerConfig {
  std::string prefix;
  std::string schema_hash;
  int grid_side = 1;
  std::vector<int> coordinates;
  int target_group_size = 0;
  int min_group_size = 2;
  std::chrono::milliseconds window{500};
  std::chrono::milliseconds request_timeout{500};
  AllReduceOptions allreduce;
  double bandwidth = 1.0;
  MemberMode mode = MemberMode::kNormal;
};

GroupKeyManager MakeKeys(const AveragerConfig& config, std::vector<int> coordinates) {
  GroupKeyOptions options;
  options.prefix = config.prefix;
  options.schema_hash = config.schema_hash;
  options.grid_side = config.grid_side;
  // d - 1 coordinates describe a d-dimensional grid; none is the flat grid (one key).
  options.grid_dims = static_cast<int>(coordinates.size()) + 1;
  options.initial_coordinates = std::move(coordinates);
  auto keys = GroupKeyManager::Create(std::move(options));
  if (!keys.ok()) Raise(keys.status());
  return std::move(keys).value();
}

// One averager's native state: the shared services of its DHT peer and its Moshpit key.
class Averager {
 public:
  Averager(std::shared_ptr<DhtRunner> runner, AveragerConfig config)
      : config_(std::move(config)), keys_(MakeKeys(config_, config_.coordinates)) {
    if (!runner || !runner->is_running()) {
      Raise(Status(StatusCode::kFailedPrecondition, "the DHT is not running"));
    }
    if (config_.mode == MemberMode::kNormal && runner->client_mode()) {
      // Nobody can dial a client-mode peer, so it must never be handed a share to reduce.
      config_.mode = MemberMode::kClient;
    }
    if (config_.mode == MemberMode::kAuxiliary && runner->client_mode()) {
      Raise(Status(StatusCode::kInvalidArgument,
                   "an auxiliary averager reduces for others, so it cannot run on a client-mode "
                   "DHT (nobody could connect to it)"));
    }
    services_ = AcquireServices(runner);
  }

  ~Averager() { Shutdown(); }

  Averager(const Averager&) = delete;
  Averager& operator=(const Averager&) = delete;

  void Shutdown() {
    std::shared_ptr<PeerServices> services;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      services = std::move(services_);
    }
    // This averager's own search ends now, even while other averagers keep the matchmaker.
    cancelled_->store(true);
    if (services) {
      services->matchmaker->WakeSearches();
      ReleaseServices(services);
    }
  }

  std::string group_key() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return keys_.CurrentKey();
  }

  std::vector<int> coordinates() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return keys_.coordinates();
  }

  void SetCoordinates(std::vector<int> coordinates) {
    GroupKeyManager keys = MakeKeys(config_, std::move(coordinates));
    std::lock_guard<std::mutex> lock(mutex_);
    keys_ = std::move(keys);
  }

  // Blocks without the GIL. On success the Moshpit key has already moved on (as hivemind does when
  // the group assembles), whatever the all-reduce that follows does.
  FormedGroup FormGroup(std::string metadata, std::chrono::milliseconds timeout) {
    std::shared_ptr<PeerServices> services = Services();
    MatchmakingOptions options;
    options.group_key = group_key();
    options.schema_hash = config_.schema_hash;
    options.metadata = std::move(metadata);
    options.bandwidth = config_.bandwidth;
    options.mode = config_.mode;
    options.min_group_size = config_.min_group_size;
    options.target_group_size = config_.target_group_size;
    options.window = config_.window;
    options.request_timeout = config_.request_timeout;
    options.timeout = timeout;
    options.cancelled = cancelled_;
    Result<FormedGroup> formed = Status();
    {
      py::gil_scoped_release release;
      formed = services->matchmaker->FormGroup(options);
    }
    if (!formed.ok()) Raise(formed.status());
    std::lock_guard<std::mutex> lock(mutex_);
    // A key changed by set_coordinates() during the search is left alone: the user's choice wins.
    if (keys_.CurrentKey() == formed->group_key) {
      const averaging::Group& group = formed->group;
      Status moved =
          keys_.OnGroupAssembled(group.id, group.my_index, static_cast<int>(group.members.size()));
      if (!moved.ok()) Raise(moved);
    }
    return std::move(formed).value();
  }

  // Averages `buffer` (a writable, contiguous buffer of float32 values, e.g. a bytearray) with the
  // group, in place. Blocks without the GIL; the buffer stays exported (so it cannot be resized)
  // for the whole call.
  py::dict AllReduce(const FormedGroup& formed, const py::buffer& buffer, double weight,
                     std::chrono::milliseconds timeout) {
    std::shared_ptr<PeerServices> services = Services();
    py::buffer_info info = buffer.request(/*writable=*/true);
    if (info.ndim != 1 || info.strides[0] != info.itemsize) {
      Raise(Status(StatusCode::kInvalidArgument, "the all-reduce buffer must be contiguous"));
    }
    const size_t bytes = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
    if (bytes % sizeof(float) != 0) {
      Raise(Status(StatusCode::kInvalidArgument,
                   "the all-reduce buffer holds " + std::to_string(bytes) +
                       " bytes, not a whole number of float32 values"));
    }
    std::vector<float> data(bytes / sizeof(float));
    if (bytes > 0) std::memcpy(data.data(), info.ptr, bytes);
    AllReduceOptions options = config_.allreduce;
    options.timeout = timeout;
    Result<SharedMean> shared = Status();
    {
      py::gil_scoped_release release;
      shared = services->allreduce->AllReduceShared(formed.group, data, static_cast<float>(weight),
                                                    options);
    }
    if (!shared.ok()) Raise(shared.status());
    // An auxiliary member gets no mean: its buffer stays as it was.
    if (shared->mean && bytes > 0) std::memcpy(info.ptr, shared->mean->data(), bytes);
    return ReportToDict(shared->report);
  }

 private:
  std::shared_ptr<PeerServices> Services() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!services_) Raise(Status(StatusCode::kFailedPrecondition, "the averager is shut down"));
    return services_;
  }

  static py::dict ReportToDict(const AllReduceReport& report) {
    py::list parts;
    for (const auto& part : report.parts) {
      parts.append(
          py::make_tuple(part.begin, part.size, part.share, part.reduced_by, part.contributors));
    }
    py::list failures;
    for (const auto& line : report.failures) failures.append(SafeStr(line));
    py::dict out;
    out["parts"] = parts;
    out["failed_members"] = report.failed_members;
    out["failures"] = failures;
    out["takeovers"] = report.takeovers;
    return out;
  }

  AveragerConfig config_;
  mutable std::mutex mutex_;  // guards keys_ and services_
  GroupKeyManager keys_;
  std::shared_ptr<PeerServices> services_;
  const std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
};

py::list PeerIds(const FormedGroup& formed) {
  py::list ids;
  for (const auto& member : formed.group.members) ids.append(member.address.peer_id.ToString());
  return ids;
}

py::list Metadata(const FormedGroup& formed) {
  py::list out;
  for (const auto& item : formed.metadata) out.append(py::bytes(item));
  return out;
}

py::list Modes(const FormedGroup& formed) {
  py::list out;
  for (const auto& member : formed.group.members) {
    out.append(member.mode == MemberMode::kNormal   ? "normal"
               : member.mode == MemberMode::kClient ? "client"
                                                    : "auxiliary");
  }
  return out;
}

std::unique_ptr<Averager> MakeAverager(
    std::shared_ptr<DhtRunner> runner, std::string prefix, py::bytes schema_hash, int grid_side,
    std::vector<int> coordinates, int target_group_size, int min_group_size, double window,
    double request_timeout, double sender_timeout, double reducer_timeout, size_t part_elements,
    double bandwidth, const std::string& mode, const std::vector<CodecRangeTuple>& codecs) {
  AveragerConfig config;
  config.prefix = std::move(prefix);
  config.schema_hash = schema_hash;
  config.grid_side = grid_side;
  config.coordinates = std::move(coordinates);
  config.target_group_size = target_group_size;
  config.min_group_size = min_group_size;
  config.window = Millis(window, "min_matchmaking_time", /*allow_zero=*/true);
  config.request_timeout = Millis(request_timeout, "request_timeout");
  config.allreduce.sender_timeout = Millis(sender_timeout, "sender_timeout");
  config.allreduce.reducer_timeout = Millis(reducer_timeout, "reducer_timeout");
  if (part_elements == 0) {
    Raise(Status(StatusCode::kInvalidArgument, "part_size_bytes must hold at least one value"));
  }
  config.allreduce.part_elements = part_elements;
  if (!averaging::IsValidBandwidth(bandwidth)) {
    Raise(Status(StatusCode::kInvalidArgument,
                 "bandwidth must be a finite number >= 0 (or undeclared), got " +
                     std::to_string(bandwidth)));
  }
  config.bandwidth = bandwidth;
  config.mode = ParseMode(mode);
  config.allreduce.codecs = ParseCodecRanges(codecs);
  return std::make_unique<Averager>(std::move(runner), std::move(config));
}

}  // namespace

void RegisterAveragingBindings(py::module_& m) {
  m.attr("_UNDECLARED_BANDWIDTH") = averaging::kUndeclaredBandwidth;
  py::class_<FormedGroup>(m, "_FormedGroup",
                          "A group found by matchmaking (C++ averaging::FormedGroup).")
      .def_property_readonly("group_id", [](const FormedGroup& f) { return py::bytes(f.group.id); })
      .def_property_readonly("peer_ids", &PeerIds)
      .def_property_readonly("modes", &Modes)
      .def_property_readonly("metadata", &Metadata)
      .def_property_readonly("my_index", [](const FormedGroup& f) { return f.group.my_index; })
      .def_property_readonly("group_key", [](const FormedGroup& f) { return f.group_key; })
      .def_property_readonly("led", [](const FormedGroup& f) { return f.led; })
      .def_property_readonly("unconfirmed_members",
                             [](const FormedGroup& f) { return f.unconfirmed_members; })
      .def_property_readonly("seconds", [](const FormedGroup& f) { return f.seconds; });

  py::class_<Averager>(m, "_Averager",
                       "Native state of one averager. Use hivemind_backend.DecentralizedAverager.")
      .def(py::init(&MakeAverager), py::kw_only(), py::arg("runner"), py::arg("prefix"),
           py::arg("schema_hash"), py::arg("grid_side"), py::arg("coordinates"),
           py::arg("target_group_size"), py::arg("min_group_size"), py::arg("window"),
           py::arg("request_timeout"), py::arg("sender_timeout"), py::arg("reducer_timeout"),
           py::arg("part_elements"), py::arg("bandwidth"), py::arg("mode"),
           py::arg("codecs") = std::vector<CodecRangeTuple>())
      .def_property_readonly("group_key", &Averager::group_key)
      .def_property_readonly("coordinates", &Averager::coordinates)
      .def("set_coordinates", &Averager::SetCoordinates, py::arg("coordinates"))
      .def(
          "form_group",
          [](Averager& self, py::bytes metadata, double timeout) {
            return self.FormGroup(std::string(metadata), Millis(timeout, "timeout"));
          },
          py::arg("metadata"), py::arg("timeout"),
          "Finds a group (blocks without the GIL); raises TimeoutError when none formed in time.")
      .def(
          "all_reduce",
          [](Averager& self, const FormedGroup& formed, const py::buffer& buffer, double weight,
             double timeout) {
            return self.AllReduce(formed, buffer, weight, Millis(timeout, "allreduce_timeout"));
          },
          py::arg("group"), py::arg("buffer"), py::arg("weight"), py::arg("timeout"),
          "Averages a float32 buffer in place with the group; returns the report.")
      .def("shutdown", &Averager::Shutdown, py::call_guard<py::gil_scoped_release>());

  m.def("_choose_codec", &ChooseTensorCodec, py::arg("codec_id"), py::arg("num_elements"),
        py::arg("dtype"),
        "The codec id a tensor travels with when codec_id is asked for every tensor (small "
        "tensors and 16-bit codecs on 16-bit tensors stay raw: codec_policy.h).");
}

}  // namespace hivemind::python
