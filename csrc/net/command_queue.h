#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <deque>
#include <functional>
#include <mutex>

namespace hivemind::net {

// How other threads hand work to a reactor thread: a locked queue plus an eventfd that the reactor
// polls next to its sockets. Once closed, posts are refused so nothing runs after the reactor is
// gone.
class CommandQueue {
 public:
  CommandQueue() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~CommandQueue() { ::close(fd_); }
  CommandQueue(const CommandQueue&) = delete;
  CommandQueue& operator=(const CommandQueue&) = delete;

  int fd() const { return fd_; }

  bool Post(std::function<void()> command) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return false;
    bool was_empty = commands_.empty();
    commands_.push_back(std::move(command));
    if (was_empty) {
      uint64_t one = 1;
      [[maybe_unused]] auto written = ::write(fd_, &one, sizeof(one));
    }
    return true;
  }

  // Reactor side: takes every queued command and clears the wake-up.
  std::deque<std::function<void()>> TakeAll() {
    uint64_t count;
    [[maybe_unused]] auto read = ::read(fd_, &count, sizeof(count));
    std::deque<std::function<void()>> taken;
    std::lock_guard<std::mutex> lock(mutex_);
    taken.swap(commands_);
    return taken;
  }

  // Refuses further posts; returns what was still queued.
  std::deque<std::function<void()>> Close() {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
    std::deque<std::function<void()>> taken;
    taken.swap(commands_);
    return taken;
  }

 private:
  int fd_;
  std::mutex mutex_;
  std::deque<std::function<void()>> commands_;
  bool closed_ = false;
};

}  // namespace hivemind::net
