// The c10d backend "hivemind": torch.distributed collectives over the swarm (docs/c10d.md).
//
// Rank-addressed operations (broadcast, gather, all-to-all, send/recv...) run among the ranks of
// this launch through the process's mailbox; all-reduce runs in the swarm group (every live rank
// of every launch with the same run id) through swarm::SwarmAverager. Operations run one at a time,
// in issue order, on one thread per process group: c10d guarantees that every rank issues the same
// collectives in the same order, so the n-th operation of a group is keyed by n everywhere.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <utility>
#include <vector>

#include "averaging/codec_policy.h"
#include "net/address.h"
#include "swarm/swarm_averager.h"
#include "swarm/swarm_peer.h"

namespace hivemind::c10d_backend {

using Clock = std::chrono::steady_clock;

// Swarm settings of a process group; hivemind_backend/c10d.py fills it from Options and the
// HIVEMIND_* environment variables.
struct BackendConfig {
  std::vector<std::string> initial_peers;  // empty: the launch starts its own swarm
  std::string run_id = "hivemind";
  std::vector<std::string> host_maddrs = {"/ip4/0.0.0.0/tcp/0"};
  std::vector<std::string> announce_maddrs;
  std::string identity_path;
  bool encryption = true;
  // Whether this group's all-reduce joins other launches of the run (the default group does when
  // initial peers are given; subgroups never do).
  bool join_swarm = false;
  int min_group_size = 1;     // launches a new averaging group waits for
  int target_group_size = 0;  // most launches in one group (0: no cap)
  int moshpit_dims = 2;       // beyond target_group_size: grid dimensions
  int moshpit_period = 10;    // and training steps between rotations
  double matchmaking_time = 2.0;
  double request_timeout = 1.0;
  double bootstrap_timeout = 30.0;
  // averaging::CodecId of the codec for float SUM/AVG all-reduces (0: none). Launches that
  // compress differently never share a group.
  int compression = 0;
};

// One operation: its outputs, and a future that completes with them (what DDP and comm hooks use).
class HivemindWork : public c10d::Work {
 public:
  HivemindWork(int rank, c10d::OpType type, const char* profiling_title,
               std::vector<at::Tensor> outputs);
  std::vector<at::Tensor> result() override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;

  void Complete();
  void Fail(std::exception_ptr error);

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

class HivemindBackend : public c10d::Backend {
 public:
  // Blocks until every rank of the group has published its address in `store`.
  HivemindBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                  std::chrono::milliseconds timeout, BackendConfig config);
  ~HivemindBackend() override;

  const std::string getBackendName() const override { return "hivemind"; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_splits,
                                               std::vector<int64_t>& input_splits,
                                               const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs,
                                          std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst_rank,
                                      int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src_rank,
                                      int tag) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;
  // Operations issued so far (TORCH_DISTRIBUTED_DEBUG=DETAIL compares them across ranks). Every
  // rank starts at 0, so there is nothing to agree on.
  void setSequenceNumberForGroup() override {}
  uint64_t getSequenceNumberForGroup() override;

  // For Python (hivemind_backend.c10d) and tests.
  std::string peer_address() const { return peer_->address(); }
  std::string launch_id() const { return launch_id_; }
  // Ranks in the current all-reduce group (0 before the first all-reduce or after a failure).
  int swarm_group_size() const;
  // Groups formed or joined so far (hivemind_backend.share_state syncs state when it changes).
  uint64_t group_generation() const { return swarm_->generation(); }
  // Whether other launches of the run are already training (this one then joins them).
  bool swarm_is_running() { return swarm_->SwarmIsRunning(); }
  // Marks this process as a newcomer: its contributions weigh next to nothing until a state
  // sync with established peers has given it their state.
  void set_joining();
  // Averages `tensors` (floating point) over the group, weighting established peers only, so a
  // newcomer ends with their state; afterwards this peer counts as established if anyone in the
  // group was. An operation like the others (same order on every member).
  c10::intrusive_ptr<c10d::Work> sync_state(std::vector<at::Tensor> tensors);
  bool established() const { return established_.load(); }

 private:
  struct Op {
    c10::intrusive_ptr<HivemindWork> work;
    std::function<void(const std::string& key, Clock::time_point deadline)> body;
    std::chrono::milliseconds timeout;
    std::string name;
  };

  c10::intrusive_ptr<c10d::Work> Enqueue(
      c10d::OpType type, const char* title, std::string name, std::vector<at::Tensor> outputs,
      std::chrono::milliseconds timeout,
      std::function<void(const std::string&, Clock::time_point)> body);
  void RunLoop();
  std::chrono::milliseconds Timeout(std::chrono::milliseconds requested) const;

  // Point-to-point among this launch's ranks. Failures throw DistBackendError naming the rank.
  Future<net::Message> SendTo(int rank, const std::string& key, const at::Tensor& tensor,
                              Clock::time_point deadline);
  net::Payload ReceiveFrom(int rank, const std::string& key, Clock::time_point deadline);
  void WaitSent(int rank, Future<net::Message>& sent);
  void WaitExchanged(std::vector<Future<net::Message>>& sends);
  std::string DescribeRank(int rank) const;

  void AllReduceNow(std::vector<at::Tensor>& tensors, c10d::ReduceOp op,
                    Clock::time_point deadline);
  void MeanAllReduce(std::vector<at::Tensor>& tensors, c10d::ReduceOp op,
                     Clock::time_point deadline);
  float Weight() const;
  void GatherAllReduce(std::vector<at::Tensor>& tensors, c10d::ReduceOp op,
                       Clock::time_point deadline);
  // Sends chunk j to rank j and reduces (op) what arrives, in rank order.
  void ReduceScatterNow(const std::string& key, at::Tensor& output,
                        const std::vector<at::Tensor>& chunks, c10d::ReduceOp op,
                        Clock::time_point deadline);

  std::shared_ptr<swarm::SwarmPeer> peer_;
  std::chrono::milliseconds timeout_;
  averaging::CodecSpec compression_;  // for float SUM/AVG all-reduces
  std::string launch_id_;
  std::vector<net::PeerAddress> ranks_;
  std::unique_ptr<swarm::SwarmAverager> swarm_;  // used by the operation thread only
  // The flat float32 vector of mean all-reduces, kept between ops (operation thread only): a
  // fresh one for a large bucket costs its page faults and zeroing every step.
  std::vector<float> mean_buffer_;
  std::atomic<int> group_size_{0};
  std::atomic<bool> established_{true};

  // (destination, tag) -> sends so far, and (source, tag) -> receives so far: the n-th send
  // matches the n-th receive.
  std::map<std::pair<int, int>, uint64_t> sends_, receives_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Op> queue_;
  uint64_t next_seq_ = 0;  // operations started
  uint64_t issued_ = 0;    // operations enqueued
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace hivemind::c10d_backend
