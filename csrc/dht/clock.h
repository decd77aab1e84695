#pragma once

#include <chrono>

namespace hivemind::dht {

// DHT time: seconds since the Unix epoch, as a double. Record expirations are absolute DHT times,
// so peers must roughly agree on it (wall clocks synchronised by NTP, as hivemind assumes).
using DhtTime = double;

// Where a DHT node reads the time. Injected so that a simulation can run hundreds of nodes on one
// virtual clock and jump hours ahead without waiting.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual DhtTime Now() const = 0;
};

// The wall clock.
class SystemClock : public Clock {
 public:
  DhtTime Now() const override {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

// A clock that only moves when told to (unit tests). Not thread-safe.
class ManualClock : public Clock {
 public:
  explicit ManualClock(DhtTime start = 1'000'000.0) : now_(start) {}
  DhtTime Now() const override { return now_; }
  void Advance(double seconds) { now_ += seconds; }
  void Set(DhtTime now) { now_ = now; }

 private:
  DhtTime now_;
};

}  // namespace hivemind::dht
