#include "dht/traversal.h"

#include <algorithm>

namespace hivemind::dht {

Traversal::Traversal(TraversalOptions options, FindFn find, ResultFn on_result, FilterFn filter,
                     DoneFn done)
    : options_(options),
      find_(std::move(find)),
      on_result_(std::move(on_result)),
      filter_(std::move(filter)),
      done_(std::move(done)) {
  if (options_.parallelism == 0) options_.parallelism = 1;
  if (options_.beam_size == 0) options_.beam_size = 1;
  if (options_.max_keys_per_request == 0) options_.max_keys_per_request = 1;
}

void Traversal::Run(std::vector<DhtId> targets, std::vector<std::vector<Contact>> initial,
                    TraversalOptions options, FindFn find, ResultFn on_result, FilterFn filter,
                    DoneFn done) {
  std::shared_ptr<Traversal> traversal(new Traversal(options, std::move(find), std::move(on_result),
                                                     std::move(filter), std::move(done)));
  std::vector<Request> requests;
  bool finished = false;
  {
    std::lock_guard<std::mutex> lock(traversal->mutex_);
    traversal->queries_.resize(targets.size());
    for (size_t q = 0; q < targets.size(); ++q) {
      traversal->queries_[q].target = targets[q];
      if (q < initial.size()) {
        for (const auto& contact : initial[q]) traversal->AddCandidate(q, contact, 1);
      }
    }
    requests = traversal->Advance(finished);
  }
  if (finished) {
    traversal->done_(traversal->Outcomes(), traversal->stats_);
    return;
  }
  traversal->Send(std::move(requests));
}

void Traversal::AddCandidate(size_t query, const Contact& contact, int hops) {
  auto found = known_index_.find(contact.peer_id);
  size_t index;
  if (found == known_index_.end()) {
    if (filter_ && !filter_(contact)) return;
    index = known_.size();
    known_.push_back(KnownContact{contact, hops});
    known_index_.emplace(contact.peer_id, index);
  } else {
    index = found->second;
  }
  Query& q = queries_[query];
  q.by_distance.emplace(known_[index].contact.id.Xor(q.target), Candidate{index});
}

template <class Visitor>
void Traversal::ForWindow(Query& query, Visitor visit) {
  size_t taken = 0;
  for (auto& [distance, candidate] : query.by_distance) {
    if (taken == options_.beam_size) break;
    if (known_[candidate.known].failed) continue;
    ++taken;
    if (!visit(distance, candidate)) break;
  }
}

bool Traversal::InWindow(Query& query, const DhtId& distance) {
  bool inside = false;
  ForWindow(query, [&](const DhtId& d, Candidate&) {
    if (d == distance) inside = true;
    return !inside && !(distance < d);
  });
  return inside;
}

void Traversal::MarkConvergedQueries() {
  for (auto& query : queries_) {
    if (query.done) continue;
    bool converged = true;
    ForWindow(query, [&](const DhtId&, Candidate& candidate) {
      converged = candidate.visit == Visit::kAnswered;
      return converged;
    });
    if (converged) query.done = true;
  }
}

std::vector<Traversal::Request> Traversal::PlanRequests() {
  std::vector<Request> requests;
  while (in_flight_ < options_.parallelism) {
    // The unfinished key with the fewest requests in flight goes first, so that one hard key does
    // not starve the others (hivemind's heuristic).
    size_t best = queries_.size();
    Candidate* pick = nullptr;
    for (size_t q = 0; q < queries_.size(); ++q) {
      Query& query = queries_[q];
      if (query.done || (best < queries_.size() && query.in_flight >= queries_[best].in_flight)) {
        continue;
      }
      Candidate* first_unvisited = nullptr;
      ForWindow(query, [&](const DhtId&, Candidate& candidate) {
        if (candidate.visit == Visit::kUnvisited) first_unvisited = &candidate;
        return first_unvisited == nullptr;
      });
      if (first_unvisited != nullptr) {
        best = q;
        pick = first_unvisited;
      }
    }
    if (pick == nullptr) break;

    Request request{pick->known, {best}};
    pick->visit = Visit::kInFlight;
    queries_[best].in_flight += 1;
    const DhtId& node_id = known_[pick->known].contact.id;
    // Ask the same node about every other key it is a good next hop for.
    for (size_t q = 0; q < queries_.size(); ++q) {
      if (request.queries.size() >= options_.max_keys_per_request) break;
      Query& query = queries_[q];
      if (q == best || query.done) continue;
      const DhtId distance = node_id.Xor(query.target);
      auto it = query.by_distance.find(distance);
      if (it == query.by_distance.end() || it->second.visit != Visit::kUnvisited) continue;
      if (!InWindow(query, distance)) continue;
      it->second.visit = Visit::kInFlight;
      query.in_flight += 1;
      request.queries.push_back(q);
    }
    in_flight_ += 1;
    stats_.requests += 1;
    requests.push_back(std::move(request));
  }
  return requests;
}

bool Traversal::AllDone() const {
  return std::all_of(queries_.begin(), queries_.end(), [](const Query& q) { return q.done; });
}

std::vector<Traversal::Request> Traversal::Advance(bool& finished) {
  MarkConvergedQueries();
  std::vector<Request> requests;
  if (!AllDone()) requests = PlanRequests();
  // A key whose window holds only failed or answered nodes and nothing left to ask is done too.
  MarkConvergedQueries();
  finished = AllDone() && !finished_;
  if (finished) finished_ = true;
  return requests;
}

void Traversal::Send(std::vector<Request> requests) {
  for (auto& request : requests) {
    std::vector<DhtId> keys;
    keys.reserve(request.queries.size());
    Contact to;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t q : request.queries) keys.push_back(queries_[q].target);
      to = known_[request.known].contact;
    }
    auto self = shared_from_this();
    find_(to, std::move(keys), [self, request](Result<std::vector<FindResult>> answer) {
      self->OnAnswer(request, std::move(answer));
    });
  }
}

void Traversal::OnAnswer(const Request& request, Result<std::vector<FindResult>> answer) {
  std::vector<Request> requests;
  bool finished = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    in_flight_ -= 1;
    if (finished_) return;
    KnownContact& responder = known_[request.known];
    const bool ok = answer.ok() && answer->size() == request.queries.size();
    if (!ok) {
      responder.failed = true;
      stats_.failures += 1;
    }
    const Contact from = responder.contact;
    const int hops = responder.hops;
    for (size_t i = 0; i < request.queries.size(); ++i) {
      const size_t q = request.queries[i];
      Query& query = queries_[q];
      query.in_flight -= 1;
      auto it = query.by_distance.find(from.id.Xor(query.target));
      if (it != query.by_distance.end()) it->second.visit = Visit::kAnswered;
      if (!ok || query.done) continue;
      const FindResult& result = (*answer)[i];
      for (const auto& contact : result.nearest) AddCandidate(q, contact, hops + 1);
      if (on_result_ && on_result_(q, from, result, hops)) {
        query.done = true;
        query.stopped_early = true;
        query.stop_hops = hops;
      }
    }
    requests = Advance(finished);
  }
  if (finished) {
    done_(Outcomes(), stats_);
    return;
  }
  Send(std::move(requests));
}

std::vector<TraversalOutcome> Traversal::Outcomes() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<TraversalOutcome> outcomes(queries_.size());
  for (size_t q = 0; q < queries_.size(); ++q) {
    Query& query = queries_[q];
    TraversalOutcome& outcome = outcomes[q];
    for (auto& [distance, candidate] : query.by_distance) {
      if (outcome.nearest.size() == options_.beam_size) break;
      const KnownContact& known = known_[candidate.known];
      if (known.failed || candidate.visit != Visit::kAnswered) continue;
      outcome.nearest.push_back(known.contact);
      if (!query.stopped_early) outcome.hops = std::max(outcome.hops, known.hops);
    }
    outcome.stopped_early = query.stopped_early;
    if (query.stopped_early) outcome.hops = query.stop_hops;
  }
  return outcomes;
}

}  // namespace hivemind::dht
