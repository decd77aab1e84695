// swarm::Mailbox over real nodes on 127.0.0.1: keyed delivery in either order, idempotent resends,
// dead senders reported promptly, limits.
#include <gtest/gtest.h>

#include <thread>

#include "swarm/mailbox.h"
#include "test_util.h"

namespace hivemind::swarm {
namespace {

using test::Clock;
using test::StartNode;

Clock::time_point In(std::chrono::milliseconds ms) { return Clock::now() + ms; }

struct Pair {
  std::unique_ptr<net::Node> a_node = StartNode();
  std::unique_ptr<net::Node> b_node = StartNode();
  Mailbox a{*a_node};
  Mailbox b{*b_node};
};

TEST(Mailbox, DeliversWhetherTheReceiverAsksBeforeOrAfter) {
  Pair p;
  ASSERT_TRUE(p.a.Send(p.b_node->visible_address(), "early", {net::Payload::FromString("one")},
                       In(std::chrono::seconds(5)))
                  .ok());
  auto early = p.b.Receive(p.a_node->visible_address(), "early", In(std::chrono::seconds(5)));
  ASSERT_TRUE(early.ok()) << early.status().ToString();
  EXPECT_EQ(early->payloads.at(0).ToString(), "one");

  std::thread late([&] {
    auto got = p.b.Receive(p.a_node->visible_address(), "late", In(std::chrono::seconds(5)));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(got->payloads.at(0).ToString(), "two");
  });
  ASSERT_TRUE(p.a.Send(p.b_node->visible_address(), "late", {net::Payload::FromString("two")},
                       In(std::chrono::seconds(5)))
                  .ok());
  late.join();
}

TEST(Mailbox, KeysAreMatchedPerSender) {
  Pair p;
  auto c_node = StartNode();
  Mailbox c(*c_node);
  ASSERT_TRUE(c.Send(p.b_node->visible_address(), "k", {net::Payload::FromString("from c")},
                     In(std::chrono::seconds(5)))
                  .ok());
  // A waits... nothing from A under "k" yet: the message from C must not be handed out.
  auto none = p.b.Receive(p.a_node->visible_address(), "k", In(std::chrono::milliseconds(300)));
  EXPECT_EQ(none.status().code(), StatusCode::kDeadlineExceeded);
  auto from_c = p.b.Receive(c_node->visible_address(), "k", In(std::chrono::seconds(5)));
  ASSERT_TRUE(from_c.ok());
  EXPECT_EQ(from_c->payloads.at(0).ToString(), "from c");
}

TEST(Mailbox, AResendOfAWaitingMessageIsAcceptedOnce) {
  Pair p;
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(p.a.Send(p.b_node->visible_address(), "dup", {net::Payload::FromString("x")},
                         In(std::chrono::seconds(5)))
                    .ok());
  }
  ASSERT_TRUE(p.b.Receive(p.a_node->visible_address(), "dup", In(std::chrono::seconds(5))).ok());
  auto second = p.b.Receive(p.a_node->visible_address(), "dup", In(std::chrono::milliseconds(300)));
  EXPECT_EQ(second.status().code(), StatusCode::kDeadlineExceeded);
}

TEST(Mailbox, AReceiverLearnsPromptlyThatItsSenderDied) {
  Pair p;
  const net::PeerAddress sender = p.a_node->visible_address();
  // Connect first, so that the receiver has a link that then breaks.
  ASSERT_TRUE(p.b.Ping(sender, std::chrono::seconds(5)).ok());
  p.a.Shutdown();
  p.a_node->Shutdown();
  const auto start = Clock::now();
  auto got = p.b.Receive(sender, "never", In(std::chrono::seconds(60)));
  EXPECT_EQ(got.status().code(), StatusCode::kUnavailable) << got.status().ToString();
  EXPECT_LT(test::SecondsSince(start), 10.0);
}

TEST(Mailbox, RefusesBadKeysAndTooMuchUnclaimedData) {
  auto a_node = StartNode();
  auto b_node = StartNode();
  Mailbox a(*a_node);
  MailboxOptions small;
  small.max_buffered_bytes = 10;
  Mailbox b(*b_node, small);
  auto empty = a.Send(b_node->visible_address(), "", {}, In(std::chrono::seconds(5)));
  EXPECT_EQ(empty.code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(a.Send(b_node->visible_address(), "fits", {net::Payload::FromString("12345678")},
                     In(std::chrono::seconds(5)))
                  .ok());
  auto over = a.Send(b_node->visible_address(), "over", {net::Payload::FromString("12345")},
                     In(std::chrono::seconds(5)));
  EXPECT_EQ(over.code(), StatusCode::kResourceExhausted) << over.ToString();
  // Claiming frees the space.
  ASSERT_TRUE(b.Receive(a_node->visible_address(), "fits", In(std::chrono::seconds(5))).ok());
  EXPECT_TRUE(a.Send(b_node->visible_address(), "over", {net::Payload::FromString("12345")},
                     In(std::chrono::seconds(5)))
                  .ok());
}

TEST(Mailbox, ShutdownWakesWaitingReceivers) {
  Pair p;
  std::thread waiter([&] {
    auto got = p.b.Receive(p.a_node->visible_address(), "k", In(std::chrono::seconds(30)));
    EXPECT_EQ(got.status().code(), StatusCode::kCancelled);
  });
  // Whether the receiver is already waiting or not, it must end with CANCELLED.
  p.b.Shutdown();
  waiter.join();
}

}  // namespace
}  // namespace hivemind::swarm
