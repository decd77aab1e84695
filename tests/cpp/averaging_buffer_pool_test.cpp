// The buffer pool of all-reduce rounds: reuse, limits, eviction order, and buffers that outlive it.
#include <gtest/gtest.h>

#include <thread>
#include <vector>

#include "averaging/buffer_pool.h"

namespace hivemind::averaging {
namespace {

TEST(BufferPool, AReturnedBufferIsReusedForTheSameOrASmallerSize) {
  auto pool = BufferPool::Create(4, 1 << 20);
  const float* memory = nullptr;
  {
    auto buffer = pool->Take(1000);
    ASSERT_EQ(buffer->size(), 1000u);
    memory = buffer->data();
  }
  EXPECT_EQ(pool->idle_buffers(), 1u);
  auto again = pool->Take(800);
  EXPECT_EQ(again->data(), memory);
  EXPECT_EQ(again->size(), 800u);
  EXPECT_EQ(pool->idle_buffers(), 0u);
  auto bigger = pool->Take(2000);  // nothing idle fits: a new buffer
  EXPECT_NE(bigger->data(), memory);
}

TEST(BufferPool, AnAdoptedVectorKeepsItsStorageAndJoinsThePoolWhenReleased) {
  auto pool = BufferPool::Create(4, 1 << 20);
  std::vector<float> caller(500, 2.0f);
  const float* memory = caller.data();
  {
    auto adopted = pool->Adopt(std::move(caller));
    EXPECT_EQ(adopted->data(), memory);
    EXPECT_EQ(*adopted, std::vector<float>(500, 2.0f));
    // Moving the contents out (a round handing results back) leaves nothing worth pooling.
    auto emptied = pool->Adopt(std::vector<float>(300));
    std::vector<float> taken = std::move(*emptied);
  }
  EXPECT_EQ(pool->idle_buffers(), 1u);
  EXPECT_EQ(pool->Take(400)->data(), memory);
}

TEST(BufferPool, TheSmallestFittingBufferIsTaken) {
  auto pool = BufferPool::Create(4, 1 << 20);
  const float* small = nullptr;
  {
    auto a = pool->Take(100);
    auto b = pool->Take(10000);
    small = a->data();
  }
  EXPECT_EQ(pool->Take(50)->data(), small);
}

TEST(BufferPool, LimitsDropTheOldestIdleBuffersFirst) {
  auto pool = BufferPool::Create(2, 1 << 20);
  const float* newest = nullptr;
  {
    auto a = pool->Take(10);
    auto b = pool->Take(20);
    auto c = pool->Take(30);
    newest = c->data();
    a.reset();
    b.reset();
    c.reset();  // the pool is full: a (the oldest) goes
  }
  EXPECT_EQ(pool->idle_buffers(), 2u);
  EXPECT_EQ(pool->Take(25)->data(), newest);

  auto bytes_limited = BufferPool::Create(8, 1000 * sizeof(float));
  bytes_limited->Take(2000).reset();  // larger than the whole budget: freed
  EXPECT_EQ(bytes_limited->idle_buffers(), 0u);
  bytes_limited->Take(600).reset();
  bytes_limited->Take(600).reset();  // reuses the same buffer
  EXPECT_EQ(bytes_limited->idle_buffers(), 1u);
}

TEST(BufferPool, BuffersMayOutliveThePoolAndReturnFromOtherThreads) {
  auto pool = BufferPool::Create(4, 1 << 20);
  auto buffer = pool->Take(64);
  std::thread([moved = pool->Take(32)]() mutable { moved.reset(); }).join();
  EXPECT_EQ(pool->idle_buffers(), 1u);
  pool.reset();
  (*buffer)[63] = 1.0f;  // still valid; freed normally below
  buffer.reset();
}

}  // namespace
}  // namespace hivemind::averaging
