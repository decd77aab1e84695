#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace hivemind {

// A fixed set of threads running posted tasks in FIFO order. Keeps CPU work and user callbacks off
// the reactor thread, which must never block.
class WorkerPool {
 public:
  explicit WorkerPool(int threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues `task`. After Shutdown, runs it on the calling thread so completions are never lost.
  void Post(std::function<void()> task);
  // Runs every task already queued, then joins the threads. Idempotent.
  void Shutdown();

 private:
  void Run();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace hivemind
