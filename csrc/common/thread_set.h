// Threads that end on their own: joined once they have (Reap) or all at once (JoinAll), so that an
// owner can start one per connection without keeping track of each.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <thread>

namespace hivemind {

class ThreadSet {
 public:
  ThreadSet() = default;
  ThreadSet(const ThreadSet&) = delete;
  ThreadSet& operator=(const ThreadSet&) = delete;
  ~ThreadSet() { JoinAll(); }

  // Runs `task` on a new thread; false (and `task` is dropped) once JoinAll has begun. Joins the
  // threads that have ended first.
  bool Spawn(std::function<void()> task) {
    Reap();
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return false;
    auto done = std::make_shared<std::atomic<bool>>(false);
    threads_.push_back(Entry{std::thread([task = std::move(task), done] {
                               task();
                               done->store(true);
                             }),
                             done});
    return true;
  }

  // Joins the threads that have ended.
  void Reap() {
    std::list<Entry> ended;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = threads_.begin(); it != threads_.end();) {
        auto next = std::next(it);
        if (it->done->load()) ended.splice(ended.end(), threads_, it);
        it = next;
      }
    }
    for (auto& entry : ended) entry.thread.join();
  }

  // Refuses new threads and waits for every thread. Must not be called from one of them.
  void JoinAll() {
    while (true) {
      std::list<Entry> all;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        closed_ = true;
        all.swap(threads_);
      }
      if (all.empty()) return;
      for (auto& entry : all) entry.thread.join();
    }
  }

 private:
  struct Entry {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex mutex_;
  bool closed_ = false;
  std::list<Entry> threads_;
};

}  // namespace hivemind
