#include "dht/sim_network.h"

#include <utility>

namespace hivemind::dht {

class SimNetwork::Transport : public DhtTransport {
 public:
  Transport(SimNetwork* network, net::PeerId self) : network_(network), self_(self) {}

  void Ping(const Contact& to, PingRequest request, Callback<PingResponse> done) override {
    net::PeerId from = self_;
    network_->Deliver<PingResponse>(
        self_, to.peer_id,
        [from, request = std::move(request)](DhtService& service) {
          return service.HandlePing(from, request);
        },
        std::move(done));
  }
  void Store(const Contact& to, StoreRequest request, Callback<StoreResponse> done) override {
    net::PeerId from = self_;
    network_->Deliver<StoreResponse>(
        self_, to.peer_id,
        [from, request = std::move(request)](DhtService& service) {
          return service.HandleStore(from, request);
        },
        std::move(done));
  }
  void Find(const Contact& to, FindRequest request, Callback<FindResponse> done) override {
    net::PeerId from = self_;
    network_->Deliver<FindResponse>(
        self_, to.peer_id,
        [from, request = std::move(request)](DhtService& service) {
          return service.HandleFind(from, request);
        },
        std::move(done));
  }

 private:
  SimNetwork* network_;
  net::PeerId self_;
};

SimNetwork::SimNetwork(Options options)
    : options_(options), now_(options.start_time), rng_(options.seed) {}

std::shared_ptr<DhtTransport> SimNetwork::CreateTransport(const net::PeerId& self) {
  return std::make_shared<Transport>(this, self);
}

void SimNetwork::Attach(const net::PeerId& peer, std::weak_ptr<DhtService> service) {
  services_[peer] = std::move(service);
}

void SimNetwork::Kill(const net::PeerId& peer) { services_.erase(peer); }

bool SimNetwork::IsUp(const net::PeerId& peer) const {
  auto it = services_.find(peer);
  return it != services_.end() && !it->second.expired();
}

void SimNetwork::Schedule(double delay_seconds, std::function<void()> action) {
  events_.push(Event{now_ + delay_seconds, next_sequence_++, std::move(action)});
}

double SimNetwork::Latency() {
  std::uniform_real_distribution<double> latency(options_.min_latency_seconds,
                                                 options_.max_latency_seconds);
  return latency(rng_);
}

template <class Response>
void SimNetwork::Deliver(const net::PeerId& from, const net::PeerId& to,
                         std::function<Result<Response>(DhtService&)> serve,
                         DhtTransport::Callback<Response> reply) {
  const double there = Latency();
  const double back = Latency();
  const DhtTime sent = now_;
  Schedule(there, [this, from, to, sent, back, serve = std::move(serve),
                   reply = std::move(reply)]() mutable {
    auto it = services_.find(to);
    std::shared_ptr<DhtService> service = it == services_.end() ? nullptr : it->second.lock();
    if (!service) {
      const double wait = sent + options_.rpc_timeout_seconds - now_;
      Schedule(wait, [reply = std::move(reply), to] {
        reply(Status(StatusCode::kDeadlineExceeded,
                     "simulated call to " + to.ShortString() + " timed out"));
      });
      return;
    }
    delivered_calls_ += 1;
    auto response = std::make_shared<Result<Response>>(serve(*service));
    Schedule(back, [this, from, to, sent, response, reply = std::move(reply)] {
      // A callee killed while the answer was on its way never answered.
      if (!IsUp(to)) {
        Schedule(sent + options_.rpc_timeout_seconds - now_, [reply, to] {
          reply(Status(StatusCode::kDeadlineExceeded,
                       "simulated call to " + to.ShortString() + " timed out"));
        });
        return;
      }
      (void)from;
      reply(std::move(*response));
    });
  });
}

bool SimNetwork::RunUntil(const std::function<bool()>& done, double max_seconds) {
  const DhtTime limit = now_ + max_seconds;
  while (!done() && !events_.empty() && events_.top().time <= limit) {
    Event event = events_.top();
    events_.pop();
    if (event.time > now_) now_ = event.time;
    event.action();
  }
  return done();
}

void SimNetwork::RunFor(double seconds) {
  const DhtTime until = now_ + seconds;
  while (!events_.empty() && events_.top().time <= until) {
    Event event = events_.top();
    events_.pop();
    if (event.time > now_) now_ = event.time;
    event.action();
  }
  now_ = until;
}

}  // namespace hivemind::dht
