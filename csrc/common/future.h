#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "common/status.h"

namespace hivemind {

namespace detail {

template <class T>
struct FutureState {
  std::mutex mutex;
  std::condition_variable ready_cv;
  std::optional<Result<T>> result;
  std::vector<std::function<void(const Result<T>&)>> callbacks;
  std::function<void()> canceller;
};

}  // namespace detail

template <class T>
class Future;

// The producing side of a one-shot result. Copies share one state; the first Set wins.
template <class T>
class Promise {
 public:
  Promise() : state_(std::make_shared<detail::FutureState<T>>()) {}

  Future<T> future() const { return Future<T>(state_); }

  // Stores the result and runs the callbacks on this thread. Returns false if a result was already
  // set.
  bool Set(Result<T> result) const {
    std::vector<std::function<void(const Result<T>&)>> callbacks;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      if (state_->result) return false;
      state_->result.emplace(std::move(result));
      callbacks.swap(state_->callbacks);
      state_->canceller = nullptr;
    }
    state_->ready_cv.notify_all();
    for (auto& callback : callbacks) callback(*state_->result);
    return true;
  }

  // Like Set, but callbacks run through `post` (for example a worker pool) instead of on this
  // thread. When nobody registered a callback, only waiters are woken, here and now: a thread that
  // must never run user code (a reactor) completes futures without an extra thread hop.
  template <class Post>
  bool SetWithCallbacksOn(Result<T> result, Post&& post) const {
    std::vector<std::function<void(const Result<T>&)>> callbacks;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      if (state_->result) return false;
      state_->result.emplace(std::move(result));
      callbacks.swap(state_->callbacks);
      state_->canceller = nullptr;
    }
    state_->ready_cv.notify_all();
    if (!callbacks.empty()) {
      post([state = state_, callbacks = std::move(callbacks)] {
        for (auto& callback : callbacks) callback(*state->result);
      });
    }
    return true;
  }

  // What Future::Cancel() asks the producer to do (for example, tell the remote peer to stop).
  void SetCanceller(std::function<void()> canceller) const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (!state_->result) state_->canceller = std::move(canceller);
  }

 private:
  std::shared_ptr<detail::FutureState<T>> state_;
};

// The consuming side of a one-shot result; cheap to copy.
template <class T>
class Future {
 public:
  Future() = default;
  explicit Future(std::shared_ptr<detail::FutureState<T>> state) : state_(std::move(state)) {}

  static Future Ready(Result<T> result) {
    Promise<T> promise;
    promise.Set(std::move(result));
    return promise.future();
  }

  bool valid() const { return state_ != nullptr; }

  bool IsReady() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->result.has_value();
  }

  // Blocks until the result is set. Every producer in this project sets a result before its
  // deadline.
  const Result<T>& Wait() const {
    std::unique_lock<std::mutex> lock(state_->mutex);
    state_->ready_cv.wait(lock, [&] { return state_->result.has_value(); });
    return *state_->result;
  }

  // Blocks at most `timeout`; nullopt when the result is still missing then.
  template <class Rep, class Period>
  std::optional<Result<T>> WaitFor(std::chrono::duration<Rep, Period> timeout) const {
    std::unique_lock<std::mutex> lock(state_->mutex);
    if (!state_->ready_cv.wait_for(lock, timeout, [&] { return state_->result.has_value(); })) {
      return std::nullopt;
    }
    return *state_->result;
  }

  // Runs `callback` once with the result: now, on this thread, if it is already set; otherwise on
  // the thread that sets it. Callbacks must not block for long.
  void OnReady(std::function<void(const Result<T>&)> callback) const {
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      if (!state_->result) {
        state_->callbacks.push_back(std::move(callback));
        return;
      }
    }
    callback(*state_->result);
  }

  // Asks the producer to stop. The future still completes, usually with kCancelled.
  void Cancel() const {
    std::function<void()> canceller;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      canceller.swap(state_->canceller);
    }
    if (canceller) canceller();
  }

 private:
  std::shared_ptr<detail::FutureState<T>> state_;
};

}  // namespace hivemind
