#include "averaging/matchmaking.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <utility>

#include "averaging/matchmaking_env.h"
#include "averaging/matchmaking_env_dht.h"
#include "common/future.h"
#include "common/logging.h"
#include "net/address.h"
#include "net/message.h"
#include "net/node.h"
#include "proto/matchmaking.pb.h"

namespace hivemind::averaging {
namespace {

namespace wire = ::hivemind::averaging::wire;
using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr char kJoinMethod[] = "matchmaking.v1.join";
constexpr char kGroupMethod[] = "matchmaking.v1.group";
constexpr char kLeaveMethod[] = "matchmaking.v1.leave";
// Answered by any live matchmaker: a follower checks on its leader while it waits for the group.
constexpr char kAliveMethod[] = "matchmaking.v1.alive";
constexpr char kOwnerTag[] = "[owner:";

uint64_t RandomU64() {
  thread_local std::mt19937_64 engine{[] {
    std::random_device device;
    return (uint64_t{device()} << 32) ^ device();
  }()};
  return engine();
}

std::string RandomBytes(size_t n) {
  std::string out;
  while (out.size() < n) {
    const uint64_t word = RandomU64();
    out.append(reinterpret_cast<const char*>(&word), std::min(n - out.size(), sizeof(word)));
  }
  return out;
}

std::string Hex64(uint64_t v) {
  std::ostringstream out;
  out << std::hex << v;
  return out.str();
}

long long MsUntil(SteadyClock::time_point t) {
  return std::max<long long>(
      0, std::chrono::duration_cast<milliseconds>(t - SteadyClock::now()).count());
}

net::Message Encode(const google::protobuf::MessageLite& message) {
  return net::Message(message.SerializeAsString());
}

// A peer's address from the multiaddrs it announced; a client announces none and is reached over
// the connection it opened itself.
net::PeerAddress AddressOf(const net::PeerId& peer,
                           const google::protobuf::RepeatedPtrField<std::string>& addresses) {
  net::PeerAddress address;
  address.peer_id = peer;
  for (const auto& text : addresses) {
    auto parsed = net::PeerAddress::Parse(text);
    if (parsed.ok() && parsed->peer_id == peer) {
      for (auto& endpoint : parsed->endpoints) address.endpoints.push_back(endpoint);
    }
  }
  return address;
}

// Strict total order on searches: earlier declared leads; ties go to the smaller peer id.
bool Before(double time_a, const net::PeerId& a, double time_b, const net::PeerId& b) {
  if (time_a != time_b) return time_a < time_b;
  return a < b;
}

struct Candidate {
  net::PeerId peer;
  uint64_t search_id = 0;
  double declared_time = 0;
  net::PeerAddress address;
  std::vector<std::string> addresses;
};

struct Follower {
  net::PeerId peer;
  uint64_t search_id = 0;
  double declared_time = 0;
  std::vector<std::string> addresses;
  double bandwidth = 1.0;
  int mode = 0;
  std::string metadata;
};

enum class Role { kSearching, kJoining, kFollowing, kDone };

// One FormGroup call. Handlers (node worker threads) and the calling thread share it under
// Matchmaker::Shared::mutex; only the calling thread makes decisions that need the network.
struct Search {
  MatchmakingOptions options;
  net::PeerId me;
  uint64_t search_id = 0;
  double declared_time = 0;

  Role role = Role::kSearching;
  net::PeerId leader;  // while joining / following
  std::vector<std::string> leader_addresses;
  uint64_t leader_search_id = 0;
  std::vector<Follower> followers;
  SteadyClock::time_point seal_deadline;
  SteadyClock::time_point deadline;  // of the whole search (options.timeout)
  bool sealed = false;
  std::optional<wire::GroupMessage> from_leader;
  uint64_t version = 0;  // bumped by every handler change; the caller's wait watches it
  std::condition_variable changed;

  bool Cancelled() const { return options.cancelled && options.cancelled->load(); }
};

}  // namespace

struct Matchmaker::Shared {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<Search>> searches;
  bool closed = false;

  // A refused asker learns who is in this full group, and skips them instead of asking each in
  // turn to hear "following" this leader: under one key, walking past k full groups then costs k
  // round trips rather than k x target.
  static void ListGroup(const Search& search, wire::JoinReply& reply) {
    auto add = [&](const net::PeerId& peer, uint64_t search_id) {
      auto* entry = reply.add_group();
      entry->set_peer_id(std::string(peer.raw()));
      entry->set_search_id(search_id);
    };
    add(search.me, search.search_id);
    for (const Follower& follower : search.followers) add(follower.peer, follower.search_id);
  }

  std::shared_ptr<Search> Find(const std::string& key) {
    auto it = searches.find(key);
    return it == searches.end() ? nullptr : it->second;
  }

  wire::JoinReply OnJoin(const net::CallContext& ctx, const wire::JoinRequest& request) {
    wire::JoinReply reply;
    std::lock_guard<std::mutex> lock(mutex);
    auto search = closed ? nullptr : Find(request.group_key());
    if (!search || search->role == Role::kDone) {
      reply.set_code(wire::JOIN_NOT_LOOKING);
      return reply;
    }
    if (search->sealed) {
      reply.set_code(wire::JOIN_FINALIZED);
      ListGroup(*search, reply);
      return reply;
    }
    if (request.schema_hash() != search->options.schema_hash) {
      reply.set_code(wire::JOIN_BAD_SCHEMA);
      reply.set_detail("schema hash differs");
      return reply;
    }
    if (request.leader_search_id() != 0 && request.leader_search_id() != search->search_id) {
      reply.set_code(wire::JOIN_BAD_SEARCH);
      return reply;
    }
    if (search->role == Role::kFollowing) {
      reply.set_code(wire::JOIN_FOLLOWING);
      for (const auto& a : search->leader_addresses) reply.add_suggested_leader(a);
      reply.set_suggested_search_id(search->leader_search_id);
      return reply;
    }
    if (!std::isfinite(request.declared_time()) ||
        request.metadata().size() > search->options.max_metadata_bytes ||
        !IsValidBandwidth(request.bandwidth()) || request.mode() < 0 ||
        request.mode() > static_cast<int>(MemberMode::kAuxiliary)) {
      reply.set_code(wire::JOIN_BAD_REQUEST);
      reply.set_detail("malformed join request (metadata over the cap, bad bandwidth or mode)");
      return reply;
    }
    // Only later peers may join, so that requests never loop; a client-mode peer may join
    // whenever it declared, since nobody asks it anything (see SearchRun::NextCandidate).
    if (request.mode() != static_cast<int>(MemberMode::kClient) &&
        !Before(search->declared_time, search->me, request.declared_time(), ctx.peer)) {
      reply.set_code(wire::JOIN_NOT_EARLIER);
      return reply;
    }
    // A repeated request from the same peer (a retry, or a new search of it) replaces the old one.
    auto& followers = search->followers;
    followers.erase(std::remove_if(followers.begin(), followers.end(),
                                   [&](const Follower& f) { return f.peer == ctx.peer; }),
                    followers.end());
    const int target = search->options.target_group_size;
    if ((target > 0 && static_cast<int>(followers.size()) + 1 >= target) ||
        followers.size() + 1 >= Group::kMaxMembers) {
      reply.set_code(wire::JOIN_GROUP_FULL);
      ListGroup(*search, reply);
      return reply;
    }
    Follower follower;
    follower.peer = ctx.peer;
    follower.search_id = request.search_id();
    follower.declared_time = request.declared_time();
    follower.addresses.assign(request.addresses().begin(), request.addresses().end());
    follower.bandwidth = request.bandwidth();
    follower.mode = request.mode();
    follower.metadata = request.metadata();
    followers.push_back(std::move(follower));
    // A group that reaches min_group_size only after the window is over gets a fresh window
    // rather than sealing at once: peers arrive in bursts (the orphans of a dead leader, peers
    // that start together), and the first of a burst to reach a peer left alone would otherwise
    // seal a pair while the rest of the burst is on its way (a 13 + 2 split of 15 orphans in a
    // sanitizer CI run, most likely because one orphan had given up on its leader early).
    const auto now = SteadyClock::now();
    if (static_cast<int>(followers.size()) + 1 == search->options.min_group_size &&
        now >= search->seal_deadline) {
      search->seal_deadline = std::min(search->deadline, now + search->options.window);
    }
    ++search->version;
    search->changed.notify_all();
    reply.set_code(wire::JOIN_ACCEPTED);
    reply.set_seal_within_ms(static_cast<uint32_t>(MsUntil(search->seal_deadline)));
    return reply;
  }

  bool OnGroup(const net::CallContext& ctx, wire::GroupMessage message) {
    std::lock_guard<std::mutex> lock(mutex);
    auto search = closed ? nullptr : Find(message.group_key());
    // Only the leader we are joining or following may hand us a group, and only for this search:
    // anything else is stale (an old round, a leader we already gave up on).
    if (!search || message.follower_search_id() != search->search_id ||
        (search->role != Role::kJoining && search->role != Role::kFollowing) ||
        search->leader != ctx.peer || search->from_leader) {
      return false;
    }
    search->from_leader = std::move(message);
    ++search->version;
    search->changed.notify_all();
    return true;
  }

  // Whether this peer leads a group under the key that counts the asker in (sealed or not: a
  // sealed group's hand-out to it is on its way).
  wire::FollowerCheckReply OnFollowerCheck(const net::CallContext& ctx,
                                           const wire::FollowerCheck& request) {
    wire::FollowerCheckReply reply;
    reply.set_status(wire::FOLLOWER_NOT_LISTED);
    std::lock_guard<std::mutex> lock(mutex);
    auto search = closed ? nullptr : Find(request.group_key());
    if (!search || search->role == Role::kFollowing) return reply;
    for (const Follower& follower : search->followers) {
      if (follower.peer == ctx.peer && follower.search_id == request.search_id()) {
        reply.set_status(wire::FOLLOWER_LISTED);
      }
    }
    return reply;
  }

  void OnLeave(const net::CallContext& ctx, const wire::LeaveRequest& request) {
    std::lock_guard<std::mutex> lock(mutex);
    auto search = closed ? nullptr : Find(request.group_key());
    if (!search || search->sealed) return;
    auto& followers = search->followers;
    followers.erase(std::remove_if(followers.begin(), followers.end(),
                                   [&](const Follower& f) {
                                     return f.peer == ctx.peer &&
                                            f.search_id == request.search_id();
                                   }),
                    followers.end());
    ++search->version;
    search->changed.notify_all();
  }
};

namespace {

// Everything FormGroup needs while it runs; one per call.
class SearchRun {
 public:
  SearchRun(MatchmakingEnv& env, std::shared_ptr<Matchmaker::Shared> shared,
            std::shared_ptr<Search> search)
      : env_(env), shared_(std::move(shared)), search_(std::move(search)) {}

  Result<FormedGroup> Run();

 private:
  struct Attempt {
    std::optional<Result<FormedGroup>> finished;
  };

  Status Declare();
  void Retract();
  // One DHT entry under the group key, parsed. Kept between reads, which come every
  // poll_period, so that an unchanged declaration is not parsed again: a peer id is base58, whose
  // decoding is quadratic, and decoding every declaration at every read dominated the CPU time of
  // a 1024-peer simulation.
  struct ParsedEntry {
    std::string value;   // what was parsed
    bool valid = false;  // the subkey names an owner and the value is a Declaration
    net::PeerId peer;
    uint64_t search_id = 0;
    bool leaving = false;
    bool may_lead = false;  // not a client, and a finite declared time: `candidate` is set
    Candidate candidate;
    uint64_t last_read = 0;
  };
  static ParsedEntry ParseEntry(const std::string& subkey, const std::string& value);
  void ReadDeclarations();
  std::optional<Candidate> NextCandidate();
  Attempt TryJoin(const Candidate& candidate);
  Result<FormedGroup> Seal();
  Result<FormedGroup> FromLeader(const wire::GroupMessage& message);
  // A redirect: the named peer is earlier than whoever sent it, so it is worth asking first.
  void AddSuggestion(const google::protobuf::RepeatedPtrField<std::string>& addresses,
                     uint64_t search_id) {
    if (addresses.empty()) return;
    auto first = net::PeerAddress::Parse(addresses.Get(0));
    if (!first.ok()) return;
    Candidate next;
    next.peer = first->peer_id;
    next.address = AddressOf(next.peer, addresses);
    next.search_id = search_id;
    next.addresses.assign(addresses.begin(), addresses.end());
    suggested_.insert(suggested_.begin(), std::move(next));
  }
  void SkipMembersOf(const wire::JoinReply& full);
  // Tells a leader that accepted us, or may have, that we are gone.
  void Leave(const Candidate& leader);
  void Disband(std::vector<Follower> followers, const Candidate* suggestion,
               const std::string& why);
  Status Failure() const;
  milliseconds RequestTimeout() const {
    return std::min<milliseconds>(search_->options.request_timeout,
                                  milliseconds(std::max<long long>(1, MsUntil(deadline_))));
  }
  const MatchmakingOptions& options() const { return search_->options; }
  void Note(std::string text) {
    if (notes_.size() < 8) notes_.push_back(std::move(text));
  }

  MatchmakingEnv& env_;
  std::shared_ptr<Matchmaker::Shared> shared_;
  std::shared_ptr<Search> search_;

  SteadyClock::time_point start_ = SteadyClock::now();
  SteadyClock::time_point deadline_;
  SteadyClock::time_point next_read_;
  double expiration_ = 0;
  std::vector<std::string> my_addresses_;

  std::map<std::pair<net::PeerId, uint64_t>, Candidate> known_;  // live declarations of others
  std::set<std::pair<net::PeerId, uint64_t>> done_with_;         // never ask again this search
  std::map<std::pair<net::PeerId, uint64_t>, SteadyClock::time_point> retry_after_;
  std::vector<Candidate> suggested_;           // redirects: asked before anything else
  std::map<std::string, ParsedEntry> parsed_;  // by subkey
  uint64_t reads_ = 0;
  size_t declarations_seen_ = 0;
  std::vector<std::string> notes_;
};

Status SearchRun::Declare() {
  wire::Declaration declaration;
  for (const auto& a : my_addresses_) declaration.add_addresses(a);
  declaration.set_declared_time(search_->declared_time);
  declaration.set_search_id(search_->search_id);
  declaration.set_client_mode(env_.client_mode());
  auto future =
      env_.StoreSubkey(options().group_key, env_.owner_marker() + Hex64(search_->search_id),
                       declaration.SerializeAsString(), expiration_);
  auto stored = future.WaitFor(milliseconds(MsUntil(deadline_)));
  if (!stored) {
    future.Cancel();
    return Status(StatusCode::kDeadlineExceeded, "could not declare under group key '" +
                                                     options().group_key +
                                                     "' before the matchmaking timeout");
  }
  if (!stored->ok())
    return stored->status().WithContext("declaring under '" + options().group_key + "'");
  if (!stored->value().status.ok()) {
    return stored->value().status.WithContext("declaring under '" + options().group_key + "'");
  }
  return Status::Ok();
}

void SearchRun::Retract() {
  // A later expiration wins in the DHT, so "leaving" replaces the declaration; nobody waits on it.
  wire::Declaration leaving;
  leaving.set_declared_time(search_->declared_time);
  leaving.set_search_id(search_->search_id);
  leaving.set_leaving(true);
  env_.StoreSubkey(options().group_key, env_.owner_marker() + Hex64(search_->search_id),
                   leaving.SerializeAsString(), expiration_ + 0.001);
}

SearchRun::ParsedEntry SearchRun::ParseEntry(const std::string& subkey, const std::string& value) {
  ParsedEntry parsed;
  parsed.value = value;
  const size_t open = subkey.find(kOwnerTag);
  const size_t close = subkey.find(']', open);
  if (open == std::string::npos || close == std::string::npos) return parsed;
  const size_t id_begin = open + sizeof(kOwnerTag) - 1;
  auto peer = net::PeerId::FromString(subkey.substr(id_begin, close - id_begin));
  wire::Declaration declaration;
  if (!peer.ok() || !declaration.ParseFromString(value)) return parsed;
  parsed.valid = true;
  parsed.peer = *peer;
  parsed.search_id = declaration.search_id();
  parsed.leaving = declaration.leaving();
  parsed.may_lead = !declaration.client_mode() && std::isfinite(declaration.declared_time());
  if (parsed.may_lead) {
    parsed.candidate.peer = *peer;
    parsed.candidate.search_id = declaration.search_id();
    parsed.candidate.declared_time = declaration.declared_time();
    parsed.candidate.address = AddressOf(*peer, declaration.addresses());
    parsed.candidate.addresses.assign(declaration.addresses().begin(),
                                      declaration.addresses().end());
  }
  return parsed;
}

void SearchRun::ReadDeclarations() {
  auto future = env_.GetLatest(options().group_key);
  auto got = future.WaitFor(milliseconds(MsUntil(deadline_)));
  if (!got) {
    future.Cancel();
    return;
  }
  if (!got->ok() || !got->value()) return;
  ++reads_;
  size_t live = 0;
  for (const auto& [subkey, entry] : got->value()->dictionary) {
    auto [cached, inserted] = parsed_.try_emplace(subkey);
    ParsedEntry& parsed = cached->second;
    if (inserted || parsed.value != entry.value) parsed = ParseEntry(subkey, entry.value);
    parsed.last_read = reads_;
    if (!parsed.valid) continue;
    const auto id = std::make_pair(parsed.peer, parsed.search_id);
    if (parsed.leaving) {
      known_.erase(id);
      continue;
    }
    ++live;
    if (parsed.peer == search_->me || !parsed.may_lead) continue;
    known_[id] = parsed.candidate;
  }
  // Entries gone from the DHT (expired) are forgotten here, so the cache stays as big as the key.
  for (auto it = parsed_.begin(); it != parsed_.end();) {
    it = it->second.last_read == reads_ ? std::next(it) : parsed_.erase(it);
  }
  declarations_seen_ = std::max(declarations_seen_, live);
}

std::optional<Candidate> SearchRun::NextCandidate() {
  const auto now = SteadyClock::now();
  auto usable = [&](const Candidate& c) {
    const auto id = std::make_pair(c.peer, c.search_id);
    if (done_with_.count(id)) return false;
    auto retry = retry_after_.find(id);
    return retry == retry_after_.end() || retry->second <= now;
  };
  while (!suggested_.empty()) {
    Candidate c = std::move(suggested_.front());
    suggested_.erase(suggested_.begin());
    if (usable(c) && c.peer != search_->me) return c;
  }
  const Candidate* best = nullptr;
  for (const auto& [id, c] : known_) {
    // Peers only ask earlier peers, so requests never loop. Nobody asks a client-mode peer (it
    // cannot be dialed), so a client asks every other peer, earliest first, or it would be left
    // out whenever it declared first.
    if (!env_.client_mode() &&
        !Before(c.declared_time, c.peer, search_->declared_time, search_->me)) {
      continue;
    }
    if (!usable(c)) continue;
    if (!best || Before(c.declared_time, c.peer, best->declared_time, best->peer)) best = &c;
  }
  if (best) return *best;
  return std::nullopt;
}

void SearchRun::Leave(const Candidate& leader) {
  wire::LeaveRequest leave;
  leave.set_group_key(options().group_key);
  leave.set_search_id(search_->search_id);
  env_.Call(leader.address, kLeaveMethod, Encode(leave), RequestTimeout());  // best effort
}

void SearchRun::SkipMembersOf(const wire::JoinReply& full) {
  // Not for good: were the leader to die before its hand-out, its members would search again.
  const auto until = SteadyClock::now() + options().request_timeout;
  for (const auto& entry : full.group()) {
    auto peer = net::PeerId::FromBytes(entry.peer_id());
    if (!peer.ok()) continue;
    auto& retry = retry_after_[std::make_pair(*peer, entry.search_id())];
    retry = std::max(retry, until);
  }
}

void SearchRun::Disband(std::vector<Follower> followers, const Candidate* suggestion,
                        const std::string& why) {
  for (const auto& f : followers) {
    wire::GroupMessage message;
    message.set_code(wire::GROUP_DISBANDED);
    message.set_group_key(options().group_key);
    message.set_follower_search_id(f.search_id);
    message.set_detail(why);
    if (suggestion) {
      for (const auto& a : suggestion->addresses) message.add_suggested_leader(a);
      message.set_suggested_search_id(suggestion->search_id);
    }
    google::protobuf::RepeatedPtrField<std::string> addresses(f.addresses.begin(),
                                                              f.addresses.end());
    // Fire and forget: the follower also gives up on its own when no group comes.
    env_.Call(AddressOf(f.peer, addresses), kGroupMethod, Encode(message), RequestTimeout());
  }
}

SearchRun::Attempt SearchRun::TryJoin(const Candidate& candidate) {
  const auto id = std::make_pair(candidate.peer, candidate.search_id);
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    search_->role = Role::kJoining;
    search_->leader = candidate.peer;
    search_->leader_addresses = candidate.addresses;
    search_->leader_search_id = candidate.search_id;
    search_->from_leader.reset();
  }
  auto back_to_searching = [&] {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    search_->role = Role::kSearching;
    search_->from_leader.reset();
  };

  wire::JoinRequest request;
  request.set_group_key(options().group_key);
  request.set_schema_hash(options().schema_hash);
  request.set_search_id(search_->search_id);
  request.set_declared_time(search_->declared_time);
  for (const auto& a : my_addresses_) request.add_addresses(a);
  request.set_bandwidth(options().bandwidth);
  request.set_mode(static_cast<int>(options().mode));
  request.set_metadata(options().metadata);
  request.set_leader_search_id(candidate.search_id);
  const auto timeout = RequestTimeout();
  auto call = env_.Call(candidate.address, kJoinMethod, Encode(request), timeout);
  auto answer = call.WaitFor(timeout + milliseconds(50));
  if (!answer) call.Cancel();
  wire::JoinReply reply;
  if (!answer || !answer->ok() || !reply.ParseFromString(answer->value().header)) {
    // A join whose answer is late may still have been accepted: say we left, or the leader could
    // hand its group to a member that takes no part (it would show up as unconfirmed, and the
    // all-reduce would wait for it).
    if (!answer || answer->status().code() == StatusCode::kDeadlineExceeded) Leave(candidate);
    done_with_.insert(id);
    Note("candidate leader " + candidate.peer.ShortString() + " did not answer (" +
         (answer && !answer->ok() ? answer->status().ToString() : std::string("no reply")) + ")");
    back_to_searching();
    return {};
  }

  switch (reply.code()) {
    case wire::JOIN_ACCEPTED:
      break;
    case wire::JOIN_FOLLOWING: {
      // It may lead again if its own leader fails: ask again after a while, and meanwhile ask the
      // leader it follows (our own reading of the DHT finds that one too).
      retry_after_[id] = SteadyClock::now() + options().poll_period;
      AddSuggestion(reply.suggested_leader(), reply.suggested_search_id());
      back_to_searching();
      return {};
    }
    case wire::JOIN_GROUP_FULL:
    case wire::JOIN_FINALIZED:
      SkipMembersOf(reply);
      done_with_.insert(id);
      back_to_searching();
      return {};
    case wire::JOIN_BAD_SCHEMA:
      Note("peer " + candidate.peer.ShortString() +
           " declared under the same key with a different schema hash");
      [[fallthrough]];
    default:
      done_with_.insert(id);
      back_to_searching();
      return {};
  }

  // Accepted: our own followers belong with our leader now.
  std::vector<Follower> mine;
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    search_->role = Role::kFollowing;
    mine.swap(search_->followers);
  }
  if (!mine.empty()) Disband(std::move(mine), &candidate, "joined an earlier leader");

  auto wait_until = std::min(deadline_, SteadyClock::now() + milliseconds(reply.seal_within_ms()) +
                                            options().request_timeout);
  // A leader that dies says nothing, so its followers check on it every request_timeout: they
  // all learn of the death at about the same time and regroup together, instead of each waiting
  // out the seal time it promised (and forming groups with whoever timed out at the same moment).
  // A leader that answers and still counts us in is worth waiting for, however late it seals: it
  // may be busy (a slow DHT read on a loaded machine held leaders past their windows while their
  // followers left, until nobody under the key could form a group).
  wire::FollowerCheck check;
  check.set_group_key(options().group_key);
  check.set_search_id(search_->search_id);
  std::optional<wire::GroupMessage> message;
  bool leader_died = false;
  bool dropped = false;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(shared_->mutex);
      const auto wake = std::min(wait_until, SteadyClock::now() + options().request_timeout);
      search_->changed.wait_until(lock, wake, [&] {
        return search_->from_leader.has_value() || shared_->closed || search_->Cancelled();
      });
      message = search_->from_leader;
      if (shared_->closed || search_->Cancelled()) {
        search_->role = Role::kDone;
        Attempt attempt;
        attempt.finished = Result<FormedGroup>(
            Status(StatusCode::kCancelled,
                   shared_->closed ? "the matchmaker was shut down" : "the search was cancelled"));
        return attempt;
      }
      if (message || SteadyClock::now() >= deadline_) break;
    }
    // Checked on every wake, the last one included: a leader that promised to seal at once
    // (its window was over) is asked before we give up on it.
    auto alive = env_.Call(candidate.address, kAliveMethod, Encode(check), RequestTimeout()).Wait();
    wire::FollowerCheckReply status;
    if (alive.ok() && status.ParseFromString(alive->header) &&
        status.status() != wire::FOLLOWER_UNSPECIFIED) {
      if (status.status() == wire::FOLLOWER_LISTED) {
        // Until past the next check and its answer.
        wait_until = std::max(
            wait_until, std::min(deadline_, SteadyClock::now() + 2 * options().request_timeout));
        continue;
      }
      std::lock_guard<std::mutex> lock(shared_->mutex);
      message = search_->from_leader;  // a disband or the group may be on its way
      dropped = !message.has_value();
      if (dropped) break;
    }
    // Only a refused connection proves death; a slow answer or an older peer proves nothing.
    if (!alive.ok() && alive.status().code() == StatusCode::kUnavailable) {
      std::lock_guard<std::mutex> lock(shared_->mutex);
      message = search_->from_leader;  // it may have sent the group just before it died
      leader_died = !message.has_value();
      if (leader_died) break;
    }
    if (SteadyClock::now() >= wait_until) {
      std::lock_guard<std::mutex> lock(shared_->mutex);
      message = search_->from_leader;
      break;
    }
  }
  if (!message) {
    Leave(candidate);
    done_with_.insert(id);
    Note(leader_died ? "leader " + candidate.peer.ShortString() + " died after accepting us"
         : dropped
             ? "leader " + candidate.peer.ShortString() + " no longer counted us in"
             : "leader " + candidate.peer.ShortString() + " accepted us but sent no group within " +
                   std::to_string(reply.seal_within_ms() + options().request_timeout.count()) +
                   " ms");
    back_to_searching();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    // We may lead now: give late followers a fresh window, longer by one request_timeout, since
    // the other followers of that leader learn of its end up to one check (request_timeout)
    // later. With the bare window, followers that noticed early could seal a group before the
    // others were free (a 13 + 2 split of 15 followers, once under the sanitizers).
    search_->seal_deadline =
        std::min(deadline_, SteadyClock::now() + options().window + options().request_timeout);
    return {};
  }
  if (message->code() == wire::GROUP_BEGIN) {
    auto formed = FromLeader(*message);
    if (formed.ok()) {
      std::lock_guard<std::mutex> lock(shared_->mutex);
      search_->role = Role::kDone;
      Attempt attempt;
      attempt.finished = std::move(formed);
      return attempt;
    }
    Note("leader " + candidate.peer.ShortString() +
         " sent a bad group: " + formed.status().ToString());
  }
  done_with_.insert(id);
  if (message->code() == wire::GROUP_DISBANDED && message->suggested_leader_size() > 0) {
    AddSuggestion(message->suggested_leader(), message->suggested_search_id());
  } else if (message->code() == wire::GROUP_DISBANDED) {
    Note("leader " + candidate.peer.ShortString() + " disbanded: " + message->detail());
  }
  back_to_searching();
  return {};
}

Result<FormedGroup> SearchRun::FromLeader(const wire::GroupMessage& message) {
  FormedGroup formed;
  formed.group.id = message.group_id();
  formed.group_key = options().group_key;
  for (const auto& m : message.members()) {
    auto peer = net::PeerId::FromBytes(m.peer_id());
    if (!peer.ok()) return peer.status();
    GroupMember member;
    member.address = AddressOf(*peer, m.addresses());
    member.bandwidth = m.bandwidth();
    if (m.mode() < 0 || m.mode() > static_cast<int>(MemberMode::kAuxiliary)) {
      return Status(StatusCode::kProtocolError, "member mode out of range");
    }
    member.mode = static_cast<MemberMode>(m.mode());
    if (*peer == search_->me) formed.group.my_index = static_cast<int>(formed.group.members.size());
    formed.group.members.push_back(std::move(member));
    formed.metadata.push_back(m.metadata());
  }
  if (formed.group.my_index < 0) {
    return Status(StatusCode::kProtocolError, "the group from the leader does not include us");
  }
  Status valid = formed.group.Validate();
  if (!valid.ok()) return valid;
  formed.seconds = std::chrono::duration<double>(SteadyClock::now() - start_).count();
  return formed;
}

Result<FormedGroup> SearchRun::Seal() {
  std::vector<Follower> followers;
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    search_->sealed = true;  // from here on, joins are refused with FINALIZED
    followers = search_->followers;
  }
  Follower self;
  self.peer = search_->me;
  self.search_id = search_->search_id;
  self.addresses = my_addresses_;
  self.bandwidth = options().bandwidth;
  self.mode = static_cast<int>(options().mode);
  self.metadata = options().metadata;
  std::vector<Follower> members = followers;
  members.push_back(self);
  // A random order, so that nobody's position (and so their share of the reduction and their next
  // Moshpit coordinate) depends on when they arrived.
  std::mt19937_64 shuffle_engine(RandomU64());
  std::shuffle(members.begin(), members.end(), shuffle_engine);

  wire::GroupMessage message;
  message.set_code(wire::GROUP_BEGIN);
  message.set_group_key(options().group_key);
  message.set_group_id(RandomBytes(20));
  for (const auto& m : members) {
    auto* member = message.add_members();
    member->set_peer_id(std::string(m.peer.raw()));
    for (const auto& a : m.addresses) member->add_addresses(a);
    member->set_bandwidth(m.bandwidth);
    member->set_mode(m.mode);
    member->set_metadata(m.metadata);
  }
  auto formed = FromLeader(message);
  if (!formed.ok()) {
    Disband(followers, nullptr, "the group is invalid: " + formed.status().message());
    return formed.status().WithContext("sealing the group under '" + options().group_key + "'");
  }
  formed->led = true;

  std::vector<std::pair<int, Future<net::Message>>> handouts;
  for (size_t i = 0; i < members.size(); ++i) {
    if (members[i].peer == search_->me) continue;
    message.set_follower_search_id(members[i].search_id);
    handouts.emplace_back(static_cast<int>(i),
                          env_.Call(formed->group.members[i].address, kGroupMethod, Encode(message),
                                    RequestTimeout()));
  }
  // Waiting for the acknowledgements costs one round trip, and tells the caller who may be missing.
  for (auto& [index, future] : handouts) {
    auto ack = future.WaitFor(RequestTimeout() + milliseconds(50));
    wire::GroupAck parsed;
    if (!ack || !ack->ok() || !parsed.ParseFromString(ack->value().header) || !parsed.accepted()) {
      if (!ack) future.Cancel();
      formed->unconfirmed_members.push_back(index);
    }
  }
  if (!formed->unconfirmed_members.empty()) {
    HM_LOG(kWarning) << "matchmaking: " << formed->unconfirmed_members.size() << " of "
                     << handouts.size() << " followers did not confirm group under '"
                     << options().group_key << "'";
  }
  formed->seconds = std::chrono::duration<double>(SteadyClock::now() - start_).count();
  return formed;
}

Status SearchRun::Failure() const {
  size_t followers;
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    followers = search_->followers.size();
  }
  std::ostringstream why;
  const long long elapsed =
      std::chrono::duration_cast<milliseconds>(SteadyClock::now() - start_).count();
  why << "matchmaking under key '" << options().group_key << "' found no group within " << elapsed
      << " ms: " << declarations_seen_ << " peer(s) declared under the key (us included)"
      << ", " << (followers + 1) << " in the group we led; min_group_size is "
      << options().min_group_size;
  for (const auto& note : notes_) why << "; " << note;
  return Status(StatusCode::kDeadlineExceeded, why.str());
}

Result<FormedGroup> SearchRun::Run() {
  deadline_ = start_ + options().timeout;
  const double timeout_s = std::chrono::duration<double>(options().timeout).count();
  expiration_ = search_->declared_time + timeout_s + 1.0;
  if (!env_.client_mode()) my_addresses_ = env_.visible_addresses();
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    search_->seal_deadline = start_ + options().window;
    search_->deadline = deadline_;
  }
  Status declared = Declare();
  if (!declared.ok()) return declared;

  Result<FormedGroup> outcome = Status(StatusCode::kInternal, "unreachable");
  next_read_ = SteadyClock::now();
  for (;;) {
    auto now = SteadyClock::now();
    if (now >= next_read_) {
      ReadDeclarations();
      next_read_ = SteadyClock::now() + options().poll_period;
    }
    if (auto candidate = NextCandidate()) {
      if (SteadyClock::now() >= deadline_) break;
      auto attempt = TryJoin(*candidate);
      if (attempt.finished) {
        outcome = std::move(*attempt.finished);
        Retract();
        return outcome;
      }
      continue;
    }

    // Nobody earlier takes us (yet): we lead. Seal when full, or when the window is over and the
    // group is big enough; otherwise wait for a follower, the next read, or the end.
    // A peer whose DHT (and so its node) was shut down cannot hand out a group any more.
    const bool dht_running = env_.is_running();
    std::unique_lock<std::mutex> lock(shared_->mutex);
    if (shared_->closed || search_->Cancelled() || !dht_running) {
      search_->role = Role::kDone;
      std::vector<Follower> left;
      left.swap(search_->followers);
      const std::string why = !dht_running      ? "the DHT of this peer was shut down"
                              : shared_->closed ? "the matchmaker was shut down"
                                                : "the search was cancelled";
      lock.unlock();
      if (dht_running) {
        Disband(std::move(left), nullptr, why);
        Retract();
      }
      return Status(StatusCode::kCancelled, why);
    }
    const int size = static_cast<int>(search_->followers.size()) + 1;
    const int target = options().target_group_size;
    now = SteadyClock::now();
    const bool big_enough = size >= options().min_group_size;
    if ((target > 0 && size >= target) ||
        (big_enough && (now >= search_->seal_deadline || now >= deadline_))) {
      lock.unlock();
      outcome = Seal();
      break;
    }
    if (now >= deadline_) break;
    auto wake = std::min(next_read_, deadline_);
    if (big_enough) wake = std::min(wake, search_->seal_deadline);
    const uint64_t seen = search_->version;
    search_->changed.wait_until(lock, wake, [&] {
      return search_->version != seen || shared_->closed || search_->Cancelled();
    });
  }

  std::vector<Follower> left;
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    search_->role = Role::kDone;
    if (!search_->sealed) left.swap(search_->followers);
  }
  Retract();
  if (search_->sealed) return outcome;
  Status failure = Failure();
  if (!left.empty()) Disband(std::move(left), nullptr, failure.message());
  return failure;
}

}  // namespace

Matchmaker::Matchmaker(dht::DhtRunner& dht)
    : Matchmaker(std::make_shared<DhtRunnerMatchmakingEnv>(dht)) {}

Matchmaker::Matchmaker(std::shared_ptr<MatchmakingEnv> env)
    : env_(std::move(env)), shared_(std::make_shared<Shared>()) {
  // The handlers hold the shared state, not the Matchmaker: a call that arrives after the
  // Matchmaker is gone finds `closed` and is refused.
  std::weak_ptr<Shared> weak = shared_;
  env_->RegisterUnary(kJoinMethod, [weak](const net::CallContext& ctx, net::Message request,
                                          net::Responder respond) {
    auto shared = weak.lock();
    wire::JoinRequest parsed;
    wire::JoinReply reply;
    if (!shared) {
      reply.set_code(wire::JOIN_NOT_LOOKING);
    } else if (!parsed.ParseFromString(request.header)) {
      reply.set_code(wire::JOIN_BAD_REQUEST);
    } else {
      reply = shared->OnJoin(ctx, parsed);
    }
    respond(Encode(reply));
  });
  env_->RegisterUnary(kGroupMethod, [weak](const net::CallContext& ctx, net::Message request,
                                           net::Responder respond) {
    auto shared = weak.lock();
    wire::GroupMessage parsed;
    wire::GroupAck ack;
    if (shared && parsed.ParseFromString(request.header)) {
      ack.set_accepted(shared->OnGroup(ctx, std::move(parsed)));
    }
    respond(Encode(ack));
  });
  env_->RegisterUnary(kAliveMethod, [weak](const net::CallContext& ctx, net::Message request,
                                           net::Responder respond) {
    auto shared = weak.lock();
    wire::FollowerCheck parsed;
    if (!shared || request.header.empty() || !parsed.ParseFromString(request.header)) {
      respond(net::Message());
      return;
    }
    respond(Encode(shared->OnFollowerCheck(ctx, parsed)));
  });
  env_->RegisterUnary(kLeaveMethod, [weak](const net::CallContext& ctx, net::Message request,
                                           net::Responder respond) {
    auto shared = weak.lock();
    wire::LeaveRequest parsed;
    if (shared && parsed.ParseFromString(request.header)) shared->OnLeave(ctx, parsed);
    respond(Encode(wire::GroupAck()));
  });
}

Matchmaker::~Matchmaker() { Shutdown(); }

void Matchmaker::Shutdown() {
  std::lock_guard<std::mutex> lock(shared_->mutex);
  shared_->closed = true;
  for (auto& [key, search] : shared_->searches) search->changed.notify_all();
}

void Matchmaker::WakeSearches() {
  std::lock_guard<std::mutex> lock(shared_->mutex);
  for (auto& [key, search] : shared_->searches) search->changed.notify_all();
}

Result<FormedGroup> Matchmaker::FormGroup(const MatchmakingOptions& options) {
  if (options.group_key.empty()) {
    return Status(StatusCode::kInvalidArgument, "matchmaking needs a group key");
  }
  if (options.min_group_size < 1 ||
      (options.target_group_size > 0 && options.target_group_size < options.min_group_size) ||
      options.target_group_size > static_cast<int>(Group::kMaxMembers)) {
    return Status(
        StatusCode::kInvalidArgument,
        "need 1 <= min_group_size <= target_group_size <= " + std::to_string(Group::kMaxMembers) +
            " (target 0 = no cap), got min " + std::to_string(options.min_group_size) +
            ", target " + std::to_string(options.target_group_size));
  }
  if (options.metadata.size() > options.max_metadata_bytes) {
    return Status(StatusCode::kInvalidArgument,
                  "matchmaking metadata is " + std::to_string(options.metadata.size()) +
                      " bytes; the cap is " + std::to_string(options.max_metadata_bytes));
  }
  if (options.timeout.count() <= 0 || options.window.count() < 0 ||
      options.request_timeout.count() <= 0 || options.poll_period.count() <= 0) {
    return Status(StatusCode::kInvalidArgument,
                  "matchmaking timeout, request_timeout and poll_period must be positive and the "
                  "window non-negative");
  }
  if (env_->client_mode() && options.mode != MemberMode::kClient) {
    return Status(StatusCode::kInvalidArgument,
                  "a client-mode DHT peer can only join groups as MemberMode::kClient");
  }
  auto search = std::make_shared<Search>();
  search->options = options;
  search->me = env_->peer_id();
  search->search_id = RandomU64() | 1;  // never 0, which means "any" on the wire
  search->declared_time = env_->Now();
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    if (shared_->closed) return Status(StatusCode::kCancelled, "the matchmaker was shut down");
    if (search->Cancelled()) return Status(StatusCode::kCancelled, "the search was cancelled");
    if (!shared_->searches.emplace(options.group_key, search).second) {
      return Status(StatusCode::kFailedPrecondition,
                    "a search under group key '" + options.group_key + "' is already running");
    }
  }
  SearchRun run(*env_, shared_, search);
  auto result = run.Run();
  {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    shared_->searches.erase(options.group_key);
  }
  return result;
}

}  // namespace hivemind::averaging
