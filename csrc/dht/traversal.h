#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "dht/contact.h"
#include "dht/dht_id.h"
#include "dht/messages.h"

namespace hivemind::dht {

struct TraversalOptions {
  // α: requests in flight at once for the whole traversal.
  size_t parallelism = 4;
  // How many nearest responders each key's search converges on (k).
  size_t beam_size = 20;
  // Keys asked of one node in one request, when the node is a useful next hop for several keys.
  size_t max_keys_per_request = 16;
};

// What one key's search ended with.
struct TraversalOutcome {
  // The nearest nodes that answered, nearest first (at most beam_size).
  std::vector<Contact> nearest;
  // The result callback said the key was satisfied before the search converged.
  bool stopped_early = false;
  // Sequential RPC depth (a node from the routing table is 1 hop, a node it named is 2, ...): of
  // the answer that satisfied the key, else of the deepest node in `nearest`.
  int hops = 0;
};

struct TraversalStats {
  int requests = 0;
  int failures = 0;
};

// The one iterative Kademlia lookup under every DHT operation (find nodes, get, store, refresh).
// It searches for many keys at once: each key keeps its own candidate list sorted by XOR distance,
// and each request asks a node about every key for which that node is a good next hop. A key's
// search ends when its beam_size nearest known live nodes have all answered (Kademlia's stopping
// rule), or as soon as the result callback reports that the key has what it needs.
//
// Thread-safe: answers may arrive on any thread. The callbacks run under the traversal's lock, so
// they must be quick and must not start calls of their own; `done` runs once, outside the lock.
class Traversal : public std::enable_shared_from_this<Traversal> {
 public:
  using FindResultsCallback = std::function<void(Result<std::vector<FindResult>>)>;
  // Sends a find request for `keys` to `to`.
  using FindFn =
      std::function<void(const Contact& to, std::vector<DhtId> keys, FindResultsCallback done)>;
  // Sees one key's answer from one node; returns true when that key needs no further answers.
  using ResultFn = std::function<bool(size_t key_index, const Contact& from,
                                      const FindResult& result, int hops)>;
  // Returns false for contacts never to call (blacklisted peers, ourselves).
  using FilterFn = std::function<bool(const Contact&)>;
  using DoneFn = std::function<void(std::vector<TraversalOutcome>, TraversalStats)>;

  // `initial[i]` are the first candidates for `targets[i]` (usually the routing table's nearest).
  static void Run(std::vector<DhtId> targets, std::vector<std::vector<Contact>> initial,
                  TraversalOptions options, FindFn find, ResultFn on_result, FilterFn filter,
                  DoneFn done);

 private:
  enum class Visit { kUnvisited, kInFlight, kAnswered };
  struct Candidate {
    size_t known;  // index into known_
    Visit visit = Visit::kUnvisited;
  };
  struct Query {
    DhtId target;
    std::map<DhtId, Candidate> by_distance;  // XOR distance to target -> candidate
    int in_flight = 0;
    bool done = false;
    bool stopped_early = false;
    int stop_hops = 0;
  };
  struct KnownContact {
    Contact contact;
    int hops;
    bool failed = false;
  };
  struct Request {
    size_t known;
    std::vector<size_t> queries;
  };

  Traversal(TraversalOptions options, FindFn find, ResultFn on_result, FilterFn filter,
            DoneFn done);

  void AddCandidate(size_t query, const Contact& contact, int hops);
  // Calls `visit` on the first beam_size live candidates of `query`, nearest first.
  template <class Visitor>
  void ForWindow(Query& query, Visitor visit);
  bool InWindow(Query& query, const DhtId& distance);
  void MarkConvergedQueries();
  std::vector<Request> PlanRequests();
  void Send(std::vector<Request> requests);
  void OnAnswer(const Request& request, Result<std::vector<FindResult>> answer);
  bool AllDone() const;
  std::vector<TraversalOutcome> Outcomes();
  // Under the lock: marks what is done and plans requests; sets `finished` when all keys are done.
  std::vector<Request> Advance(bool& finished);

  TraversalOptions options_;
  FindFn find_;
  ResultFn on_result_;
  FilterFn filter_;
  DoneFn done_;

  std::mutex mutex_;
  std::vector<Query> queries_;
  std::vector<KnownContact> known_;
  std::unordered_map<net::PeerId, size_t> known_index_;
  size_t in_flight_ = 0;
  bool finished_ = false;
  TraversalStats stats_;
};

}  // namespace hivemind::dht
