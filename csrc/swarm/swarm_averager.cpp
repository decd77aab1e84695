#include "swarm/swarm_averager.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "averaging/group.h"
#include "averaging/matchmaking.h"
#include "common/logging.h"
#include "dht/dht_runner.h"

namespace hivemind::swarm {
namespace {

// Matchmaking keeps launches with a different schema apart: bump it when the group description
// or the round protocol changes.
constexpr char kSchema[] = "hivemind-c10d-swarm-v1";
constexpr char kErrorPrefix[] = "error:";

std::chrono::milliseconds Left(Clock::time_point deadline) {
  return std::max(std::chrono::milliseconds(1),
                  std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
}

std::string Text(const net::Message& message) {
  return message.payloads.empty() ? std::string() : message.payloads.front().ToString();
}

}  // namespace

SwarmAverager::SwarmAverager(Mailbox& mailbox, averaging::AllReduceService& allreduce,
                             averaging::Matchmaker* matchmaker, dht::DhtRunner* dht,
                             LaunchInfo launch, SwarmOptions options)
    : mailbox_(mailbox),
      allreduce_(allreduce),
      matchmaker_(matchmaker),
      launch_(std::move(launch)),
      options_(std::move(options)),
      launch_alive_(launch_.ranks.size(), true),
      dht_(dht) {
  if (moshpit()) {
    averaging::GroupKeyOptions grid;
    grid.prefix = options_.matchmaking_key;
    grid.grid_side = options_.target_group_size;
    grid.grid_dims = std::max(1, options_.moshpit_dims);
    // A launch's starting cell: spread by its random id (launches know nothing of each other).
    grid.rank = static_cast<int64_t>(std::hash<std::string>()(launch_.launch_id) >> 1);
    auto created = averaging::GroupKeyManager::Create(grid);
    if (created.ok()) {
      keys_ = std::move(created).value();
    } else {  // only for a prefix the Python side lets through by mistake
      HM_LOG(kError) << "swarm: no Moshpit grid, groups will not rotate: "
                     << created.status().ToString();
    }
  }
  if (!options_.matchmaking_key.empty() && dht_ != nullptr) {
    presence_key_ = options_.matchmaking_key + ".presence";
    presence_thread_ = std::thread([this] { PresenceLoop(); });
  }
}

SwarmAverager::~SwarmAverager() {
  {
    std::lock_guard<std::mutex> lock(presence_mutex_);
    presence_stop_ = true;
  }
  presence_wake_.notify_all();
  if (presence_thread_.joinable()) presence_thread_.join();
}

void SwarmAverager::PresenceLoop() {
  std::unique_lock<std::mutex> lock(presence_mutex_);
  while (!presence_stop_) {
    lock.unlock();
    PublishAndCheckPresence();
    lock.lock();
    presence_wake_.wait_for(lock, options_.presence_period, [&] { return presence_stop_; });
  }
}

// Entries are "<group fingerprint>|<DHT time written>", one per launch leader (subkey: its owner
// marker, so only it can write it), rewritten every period and expiring after five.
void SwarmAverager::PublishAndCheckPresence() {
  std::string mine;
  double formed_at;
  bool leading;
  {
    std::lock_guard<std::mutex> lock(presence_mutex_);
    mine = published_id_;
    formed_at = formed_at_;
    leading = leading_;
  }
  if (!leading || mine.empty()) return;
  const double period = std::chrono::duration<double>(options_.presence_period).count();
  const double now = dht::DhtNow();
  auto stored = dht_->Store(presence_key_, mine + "|" + std::to_string(now), now + 5 * period,
                            dht_->owner_marker());
  if (!stored.ok()) {
    HM_LOG(kDebug) << "swarm: could not publish presence: " << stored.status().ToString();
  }
  auto found = dht_->Get(presence_key_, /*latest=*/true);
  if (!found.ok() || !found->has_value()) return;
  for (const auto& [subkey, entry] : (*found)->dictionary) {
    if (subkey == dht_->owner_marker()) continue;
    const size_t bar = entry.value.find('|');
    if (bar == std::string::npos) continue;
    const std::string id = entry.value.substr(0, bar);
    double written = 0;
    try {
      written = std::stod(entry.value.substr(bar + 1));
    } catch (...) {
      continue;
    }
    // A launch in another group, alive after ours formed or last shrank: a newcomer, a group
    // that formed apart, or a member we dropped while it was alive (it still publishes the group
    // as it was, or the one it formed since). One that last wrote before that and is not in our
    // group has died since.
    // With Moshpit, other groups exist by design and everyone rotates anyway.
    if (id != mine && written > formed_at && !moshpit()) {
      if (!regroup_wanted_.exchange(true)) {
        HM_LOG(kInfo) << "swarm: a launch outside this group is in the run (group "
                      << id.substr(0, 12) << "); regrouping at the next training step";
      }
      return;
    }
  }
}

bool SwarmAverager::SwarmIsRunning() {
  if (presence_key_.empty()) return false;
  auto found = dht_->Get(presence_key_, /*latest=*/true);
  if (!found.ok() || !found->has_value()) return false;
  for (const auto& [subkey, entry] : (*found)->dictionary) {
    if (subkey != dht_->owner_marker()) return true;
  }
  return false;
}

void SwarmAverager::Formed(SwarmGroup group) {
  base_id_ = group.id;
  group_ = std::move(group);
  ++generation_;
  std::lock_guard<std::mutex> lock(presence_mutex_);
  published_id_ = group_->Fingerprint();
  formed_at_ = dht::DhtNow();
  leading_ = launch_alive_[launch_.rank] && [&] {
    for (int r = 0; r < launch_.rank; ++r) {
      if (launch_alive_[r]) return false;
    }
    return true;
  }();
}

std::string SwarmAverager::NextOpId() {
  return base_id_ + "." + std::to_string(shrinks_) + "/" + std::to_string(op_index_++);
}

Status SwarmAverager::EnsureGroup(Clock::time_point deadline, const std::string& signature) {
  if (anchor_.empty()) anchor_ = signature;
  if (group_ && signature == anchor_) {
    // Every member counts the same anchors since the group formed, so they rotate together.
    ++anchors_in_group_;
    if (moshpit() && anchors_in_group_ > options_.moshpit_period) regroup_agreed_ = true;
  }
  if (group_ && !(regroup_agreed_ && signature == anchor_)) return Status::Ok();
  regroup_agreed_ = false;
  anchors_in_group_ = 0;
  if (signature == anchor_ || options_.matchmaking_key.empty()) return Form(deadline, true);
  // Without a group in the middle of a training step (the last op failed, or the others dropped
  // this launch): matchmaking here could meet launches waiting at the anchor, whose ops would not
  // line up with ours. Finish the step within this launch and matchmake at the next anchor.
  Status formed = Form(deadline, false);
  if (formed.ok()) regroup_agreed_ = true;
  return formed;
}

Status SwarmAverager::Form(Clock::time_point deadline, bool matchmake) {
  ++epoch_;
  group_.reset();
  shrinks_ = 0;
  op_index_ = 0;
  while (true) {
    int leader = 0;
    while (!launch_alive_[leader]) ++leader;  // terminates: this rank is always alive
    const std::string key =
        launch_.launch_id + "/form/" + std::to_string(epoch_) + "/" + std::to_string(leader);
    if (leader == launch_.rank) {
      auto formed = LeadFormation(key, deadline, matchmake);
      if (!formed.ok()) return formed.status();
      Formed(std::move(formed).value());
      return Status::Ok();
    }
    auto message = mailbox_.Receive(launch_.ranks[leader], key, deadline);
    if (!message.ok()) {
      if (message.status().code() == StatusCode::kUnavailable) {
        HM_LOG(kWarning) << "swarm: launch leader rank " << leader
                         << " is unreachable; the next live rank takes over: "
                         << message.status().ToString();
        launch_alive_[leader] = false;
        continue;
      }
      return message.status().WithContext("waiting for the group from rank " +
                                          std::to_string(leader) + " (this launch's leader)");
    }
    const std::string text = Text(*message);
    if (text.rfind(kErrorPrefix, 0) == 0) {
      return Status(StatusCode::kUnavailable, "rank " + std::to_string(leader) +
                                                  " (this launch's leader) could not form a "
                                                  "group: " +
                                                  text.substr(sizeof(kErrorPrefix) - 1));
    }
    auto group = SwarmGroup::Decode(text, mailbox_.node().peer_id());
    if (!group.ok()) return group.status();
    Formed(std::move(group).value());
    return Status::Ok();
  }
}

Result<SwarmGroup> SwarmAverager::LeadFormation(const std::string& key, Clock::time_point deadline,
                                                bool matchmake) {
  const int size = static_cast<int>(launch_.ranks.size());
  std::vector<SwarmMember> mine;
  for (int r = 0; r < size; ++r) {
    if (!launch_alive_[r]) continue;
    if (r != launch_.rank) {
      Status alive =
          mailbox_.Ping(launch_.ranks[r], std::min(options_.liveness_timeout, Left(deadline)));
      if (!alive.ok()) {
        HM_LOG(kWarning) << "swarm: rank " << r
                         << " is left out of the new group: " << alive.ToString();
        launch_alive_[r] = false;
        continue;
      }
    }
    mine.push_back(SwarmMember{launch_.ranks[r], launch_.launch_id, r, size});
  }

  SwarmGroup group;
  Status failed;
  if (options_.matchmaking_key.empty() || !matchmake) {
    group.id = launch_.launch_id + "-" + std::to_string(epoch_);
    group.members = mine;
  } else {
    averaging::MatchmakingOptions search;
    search.group_key = options_.matchmaking_key;
    if (keys_) search.group_key = keys_->CurrentKey();
    // Launches only meet at the same anchor op, so their op sequences line up afterwards.
    search.schema_hash = std::string(kSchema) + "/" + anchor_;
    search.metadata = EncodeMembers(mine);
    search.min_group_size = generation_ == 0 && !joining_ ? options_.min_group_size : 1;
    search.target_group_size = options_.target_group_size;
    search.window = options_.matchmaking_time;
    search.request_timeout = options_.request_timeout;
    search.timeout = Left(deadline);
    auto formed = matchmaker_->FormGroup(search);
    if (!formed.ok()) {
      failed = formed.status();
    } else {
      group.id = HexId(formed->group.id);
      if (keys_) {
        Status moved = keys_->OnGroupAssembled(formed->group.id, formed->group.my_index,
                                               static_cast<int>(formed->group.members.size()));
        if (!moved.ok()) {
          HM_LOG(kWarning) << "swarm: Moshpit key not moved: " << moved.ToString();
        }
      }
      for (const std::string& metadata : formed->metadata) {
        auto members = DecodeMembers(metadata);
        if (!members.ok()) {
          failed = members.status().WithContext("a launch in the matched group");
          break;
        }
        group.members.insert(group.members.end(), members->begin(), members->end());
      }
    }
  }
  for (size_t i = 0; failed.ok() && i < group.members.size(); ++i) {
    if (group.members[i].address.peer_id == mailbox_.node().peer_id()) {
      group.my_index = static_cast<int>(i);
    }
  }
  if (failed.ok() && group.my_index < 0) {
    failed = Status(StatusCode::kInternal, "the formed group does not contain this peer");
  }

  // Tell the other live ranks of this launch (about the failure too, so they fail at once).
  const std::string body = failed.ok() ? group.Encode() : kErrorPrefix + failed.ToString();
  std::vector<Future<net::Message>> sends;
  for (const SwarmMember& member : mine) {
    if (member.rank == launch_.rank) continue;
    sends.push_back(
        mailbox_.SendAsync(member.address, key, {net::Payload::FromString(body)}, deadline));
  }
  for (auto& send : sends) {
    if (!send.Wait().ok()) {
      // That rank will miss the first round and be dropped from the group after it.
      HM_LOG(kWarning) << "swarm: could not hand the group to a rank: "
                       << send.Wait().status().ToString();
    }
  }
  if (!failed.ok()) return failed;
  HM_LOG(kInfo) << "swarm: formed group " << group.id.substr(0, 16) << " with "
                << group.members.size() << " ranks";
  return group;
}

void SwarmAverager::Shrink(const std::vector<int>& keep) {
  SwarmGroup next;
  for (int index : keep) {
    next.members.push_back(group_->members[index]);
    if (index == group_->my_index) next.my_index = static_cast<int>(next.members.size()) - 1;
  }
  for (int i = 0; i < static_cast<int>(group_->members.size()); ++i) {
    const SwarmMember& member = group_->members[i];
    if (std::find(keep.begin(), keep.end(), i) != keep.end()) continue;
    HM_LOG(kWarning) << "swarm: " << member.Describe() << " left the group";
    if (member.launch_id == launch_.launch_id) launch_alive_[member.rank] = false;
  }
  ++shrinks_;
  op_index_ = 0;
  next.id = base_id_ + "." + std::to_string(shrinks_);
  group_ = std::move(next);
  std::lock_guard<std::mutex> lock(presence_mutex_);
  published_id_ = group_->Fingerprint();
  formed_at_ = dht::DhtNow();
}

Result<MeanReport> SwarmAverager::Mean(std::vector<float>& data, Clock::time_point deadline,
                                       const std::string& signature, float weight,
                                       std::vector<averaging::CodecRange> codecs) {
  const size_t size = data.size();
  auto report = MeanShared(data, deadline, signature, weight, std::move(codecs));
  if (!report.ok()) return report;
  data.resize(size);  // no allocation unless the transport kept the input's storage
  if (size > 0) std::memcpy(data.data(), report->mean->data(), size * sizeof(float));
  return report;
}

Result<MeanReport> SwarmAverager::MeanShared(std::vector<float>& data, Clock::time_point deadline,
                                             const std::string& signature, float weight,
                                             std::vector<averaging::CodecRange> codecs,
                                             bool input_checked, float* mirror,
                                             size_t mirror_elements) {
  if (!dropped_.ok()) return dropped_;
  Status ready = EnsureGroup(deadline, signature);
  if (!ready.ok()) return ready;
  MeanReport report;
  report.group = *group_;
  const SwarmGroup& group = report.group;
  const std::string round_id = NextOpId();
  const int n = static_cast<int>(group.members.size());
  if (n == 1) {
    report.contributors = {0};
    report.mean = std::make_shared<const std::vector<float>>(data);
    // Alone, this peer's wish is the group's decision.
    if (regroup_wanted_.exchange(false)) regroup_agreed_ = true;
    return report;
  }

  averaging::Group round;
  round.id = round_id;
  round.my_index = group.my_index;
  for (const SwarmMember& member : group.members) {
    averaging::GroupMember m;
    m.address = member.address;
    round.members.push_back(std::move(m));
  }
  averaging::AllReduceOptions options = options_.allreduce;
  options.codecs = std::move(codecs);
  options.input_checked = input_checked;  // the regroup vote appended below is 0 or 1
  options.mirror = mirror;
  options.mirror_elements = mirror_elements;
  options.timeout = Left(deadline);
  options.sender_timeout = std::min(options.sender_timeout, options.timeout);
  options.reducer_timeout = std::min(options.reducer_timeout, options.timeout);

  const size_t size = data.size();
  data.push_back(regroup_wanted_.exchange(false) ? 1.0f : 0.0f);
  auto shared = allreduce_.AllReduceShared(round, data, weight, options);
  if (!shared.ok()) {
    data.pop_back();
    group_.reset();
    return shared.status().WithContext("all-reduce round in a group of " + std::to_string(n) +
                                       " ranks");
  }
  if (!data.empty()) data.pop_back();
  const averaging::AllReduceReport& result = shared->report;
  report.mean = shared->mean;
  report.mirrored = shared->mirrored;
  const bool regroup = (*report.mean)[size] > 0;

  std::vector<int> everywhere;
  for (int i = 0; i < n; ++i) {
    bool in_all = true;
    for (const auto& part : result.parts) {
      if (std::find(part.contributors.begin(), part.contributors.end(), i) ==
          part.contributors.end()) {
        in_all = false;
        break;
      }
    }
    if (in_all) everywhere.push_back(i);
  }
  report.contributors = everywhere;
  report.failures = result.failures;
  if (std::find(everywhere.begin(), everywhere.end(), group.my_index) == everywhere.end()) {
    group_.reset();
    if (options_.matchmaking_key.empty()) {
      // The others dropped this rank (it was silent too long) and go on without it. A standalone
      // launch has no way back in (its leader only forms groups at start), so say so now rather
      // than wait for a group that never comes; torchrun's restart is the recovery.
      dropped_ = Status(
          StatusCode::kUnavailable,
          "the other ranks dropped this rank from the averaging group (" +
              (result.failures.empty() ? std::string("it was too slow") : result.failures.front()) +
              "); a launch without initial peers cannot take it back");
      return dropped_;
    }
    // In a swarm, the presence records bring it back at the next regroup.
  } else if (static_cast<int>(everywhere.size()) < n) {
    Shrink(everywhere);
  }
  if (regroup) regroup_agreed_ = true;
  return report;
}

Result<std::pair<SwarmGroup, std::vector<net::Payload>>> SwarmAverager::AllGather(
    net::Payload mine, Clock::time_point deadline, const std::string& signature) {
  if (!dropped_.ok()) return dropped_;
  Status ready = EnsureGroup(deadline, signature);
  if (!ready.ok()) return ready;
  SwarmGroup group = *group_;
  const std::string key = NextOpId() + "/gather";
  const int n = static_cast<int>(group.members.size());
  std::vector<Future<net::Message>> sends(n);
  for (int j = 0; j < n; ++j) {
    if (j != group.my_index)
      sends[j] = mailbox_.SendAsync(group.members[j].address, key, {mine}, deadline);
  }
  std::vector<net::Payload> all(n);
  std::string failures;
  for (int j = 0; j < n; ++j) {
    if (j == group.my_index) {
      all[j] = mine;
      continue;
    }
    auto received = mailbox_.Receive(group.members[j].address, key, deadline);
    // Only what this member needs decides its outcome. A send that fails to a member whose data
    // arrived is no failure here: that member was alive for this op, and when the reply is lost
    // because it finished first and exited, it had everything it needed.
    if (!received.ok()) {
      failures += (failures.empty() ? "" : "; ") + group.members[j].Describe() + ": " +
                  received.status().ToString();
      continue;
    }
    if (received->payloads.size() != 1) {
      failures += (failures.empty() ? "" : "; ") + group.members[j].Describe() +
                  ": sent a malformed message";
      continue;
    }
    all[j] = std::move(received->payloads.front());
  }
  for (int j = 0; j < n; ++j) {
    if (j != group.my_index && !sends[j].Wait().ok()) {
      HM_LOG(kInfo) << "swarm: " << group.members[j].Describe()
                    << " did not confirm receipt: " << sends[j].Wait().status().ToString();
    }
  }
  if (!failures.empty()) {
    group_.reset();
    return Status(StatusCode::kUnavailable,
                  "exchange in a group of " + std::to_string(n) + " ranks failed: " + failures);
  }
  return std::make_pair(std::move(group), std::move(all));
}

}  // namespace hivemind::swarm
