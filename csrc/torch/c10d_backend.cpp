#include "torch/c10d_backend.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>

#include "averaging/reduce_kernels.h"
#include "common/huge_pages.h"
#include "common/logging.h"

namespace hivemind::c10d_backend {
namespace {

constexpr char kPeerKey[] = "hivemind/peer/";
constexpr char kLaunchKey[] = "hivemind/launch";

[[noreturn]] void Fail(const std::string& message) {
  C10_THROW_ERROR(DistBackendError, "hivemind: " + message);
}

void Check(bool condition, const std::string& message) {
  if (!condition) C10_THROW_ERROR(ValueError, "hivemind: " + message);
}

std::string RandomHex(size_t bytes) {
  std::random_device device;
  std::ostringstream out;
  for (size_t i = 0; i < bytes; ++i) {
    out << "0123456789abcdef"[device() % 16] << "0123456789abcdef"[device() % 16];
  }
  return out.str();
}

std::string ToString(const std::vector<uint8_t>& bytes) {
  return std::string(bytes.begin(), bytes.end());
}

std::vector<uint8_t> ToBytes(const std::string& text) {
  return std::vector<uint8_t>(text.begin(), text.end());
}

// Contiguous CPU bytes of `tensor`, kept alive by the payload (no copy for contiguous CPU tensors).
net::Payload TensorPayload(const at::Tensor& tensor) {
  at::Tensor cpu = tensor.to(at::kCPU).contiguous();
  auto owner = std::make_shared<at::Tensor>(cpu);
  return net::Payload(cpu.data_ptr(), cpu.nbytes(),
                      std::shared_ptr<const void>(owner, owner.get()));
}

// A CPU tensor that views the payload's bytes as `like`'s dtype and shape.
at::Tensor PayloadTensor(const net::Payload& payload, const at::Tensor& like) {
  auto owner = payload.owner();
  return at::from_blob(
      payload.mutable_data(), like.sizes(), [owner](void*) {},
      at::TensorOptions().dtype(like.scalar_type()).device(at::kCPU));
}

void CheckDense(const at::Tensor& tensor, const char* what) {
  Check(tensor.defined(), std::string(what) + " is undefined");
  Check(tensor.layout() == at::kStrided,
        std::string(what) + " is sparse; only dense tensors are supported");
}

bool MeanFriendly(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16:
      return true;
    default:
      return false;
  }
}

const char* OpName(c10d::ReduceOp::RedOpType op) {
  switch (op) {
    case c10d::ReduceOp::SUM:
      return "SUM";
    case c10d::ReduceOp::AVG:
      return "AVG";
    case c10d::ReduceOp::PRODUCT:
      return "PRODUCT";
    case c10d::ReduceOp::MIN:
      return "MIN";
    case c10d::ReduceOp::MAX:
      return "MAX";
    case c10d::ReduceOp::BAND:
      return "BAND";
    case c10d::ReduceOp::BOR:
      return "BOR";
    case c10d::ReduceOp::BXOR:
      return "BXOR";
    default:
      return "unsupported";
  }
}

void CheckOp(const c10d::ReduceOp& op) {
  Check(std::string(OpName(op.op_)) != "unsupported",
        "reduce op " + std::to_string(static_cast<int>(op.op_)) +
            " is not supported (SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR are)");
}

// Reduces `inputs` (all shaped like inputs[0]) in their order, so every rank that reduces the same
// inputs gets bitwise the same result. AVG divides by the count.
at::Tensor Combine(const std::vector<at::Tensor>& inputs, c10d::ReduceOp::RedOpType op) {
  at::Tensor acc = inputs.front().clone();
  for (size_t i = 1; i < inputs.size(); ++i) {
    const at::Tensor& x = inputs[i];
    switch (op) {
      case c10d::ReduceOp::SUM:
      case c10d::ReduceOp::AVG:
        acc.add_(x);
        break;
      case c10d::ReduceOp::PRODUCT:
        acc.mul_(x);
        break;
      case c10d::ReduceOp::MIN:
        acc = at::minimum(acc, x);
        break;
      case c10d::ReduceOp::MAX:
        acc = at::maximum(acc, x);
        break;
      case c10d::ReduceOp::BAND:
        acc.bitwise_and_(x);
        break;
      case c10d::ReduceOp::BOR:
        acc.bitwise_or_(x);
        break;
      case c10d::ReduceOp::BXOR:
        acc.bitwise_xor_(x);
        break;
      default:
        Fail("unsupported reduce op");
    }
  }
  if (op == c10d::ReduceOp::AVG) {
    const auto count = static_cast<int64_t>(inputs.size());
    if (at::isFloatingType(acc.scalar_type()) || at::isComplexType(acc.scalar_type())) {
      acc.div_(count);
    } else {
      acc = at::div(acc, count, "trunc").to(acc.scalar_type());
    }
  }
  return acc;
}

void CopyInto(at::Tensor& destination, const at::Tensor& source) {
  destination.copy_(source.view(destination.sizes()));
}

}  // namespace

// ---- HivemindWork ----

HivemindWork::HivemindWork(int rank, c10d::OpType type, const char* profiling_title,
                           std::vector<at::Tensor> outputs)
    : c10d::Work(rank, type, profiling_title),
      outputs_(std::move(outputs)),
      future_(
          c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {
}

std::vector<at::Tensor> HivemindWork::result() { return outputs_; }

c10::intrusive_ptr<c10::ivalue::Future> HivemindWork::getFuture() { return future_; }

void HivemindWork::Complete() {
  // Callbacks of the future (DDP's, comm hooks') run here, on the operation thread, with no lock
  // of ours held.
  future_->markCompleted(c10::IValue(outputs_));
  finish();
}

void HivemindWork::Fail(std::exception_ptr error) {
  future_->setError(error);
  finish(error);
}

// ---- construction ----

HivemindBackend::HivemindBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                 std::chrono::milliseconds timeout, BackendConfig config)
    : c10d::Backend(rank, size),
      timeout_(timeout),
      compression_{static_cast<averaging::CodecId>(config.compression), 0} {
  Check(size >= 1 && rank >= 0 && rank < size,
        "rank " + std::to_string(rank) + " is not in a group of size " + std::to_string(size));
  Status codec_ok = averaging::ValidateSpec(compression_);
  Check(codec_ok.ok(), "compression: " + codec_ok.ToString());
  peer_ = swarm::SwarmPeer::Current();
  if (!peer_) {
    dht::DhtRunnerOptions options;
    options.initial_peers = config.initial_peers;
    options.listen_addresses = config.host_maddrs;
    options.announce_addresses = config.announce_maddrs;
    options.identity_path = config.identity_path;
    options.encryption = config.encryption;
    options.bootstrap_timeout =
        std::chrono::milliseconds(static_cast<int64_t>(config.bootstrap_timeout * 1000));
    // Given peers must answer (a typo should not silently start a lonely swarm); rank 0's
    // address, added below for the others, always does.
    options.ensure_bootstrap_success = !config.initial_peers.empty();
    if (rank != 0) {
      // The ranks of a launch join rank 0's swarm: with no initial peers this is how a plain
      // torchrun launch gets a swarm of its own.
      options.initial_peers.push_back(ToString(store->get(kPeerKey + std::to_string(0))));
      options.ensure_bootstrap_success = true;
    }
    auto started = swarm::SwarmPeer::Acquire(options);
    if (!started.ok()) Fail(started.status().ToString());
    peer_ = std::move(started).value();
  }
  store->set(kPeerKey + std::to_string(rank), ToBytes(peer_->address()));
  if (rank == 0) store->set(kLaunchKey, ToBytes(RandomHex(8)));
  launch_id_ = ToString(store->get(kLaunchKey));
  for (int r = 0; r < size; ++r) {
    const std::string text = ToString(store->get(kPeerKey + std::to_string(r)));
    auto address = net::PeerAddress::ParseList(text);
    if (!address.ok()) Fail("rank " + std::to_string(r) + " published a bad address: " + text);
    ranks_.push_back(std::move(address).value());
  }

  swarm::LaunchInfo launch{launch_id_, rank, ranks_};
  swarm::SwarmOptions options;
  if (config.join_swarm && !config.initial_peers.empty()) {
    options.matchmaking_key = config.run_id + "_c10d";
    if (compression_.id != averaging::CodecId::kNone) {
      options.matchmaking_key += std::string("_") + averaging::CodecName(compression_.id);
    }
  }
  options.min_group_size = config.min_group_size;
  options.target_group_size = config.target_group_size;
  options.moshpit_dims = config.moshpit_dims;
  options.moshpit_period = config.moshpit_period;
  options.matchmaking_time =
      std::chrono::milliseconds(static_cast<int64_t>(config.matchmaking_time * 1000));
  options.request_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(config.request_timeout * 1000));
  // Dead peers are found by liveness probes and broken streams within about half a second, so
  // the "silent for too long" timeouts only catch live but stuck peers. Keep them long: peers on
  // slower hardware may reach an all-reduce many seconds after the others, and must not be
  // dropped for it. Both are bounded by the op timeout anyway.
  options.allreduce.liveness_probe = std::chrono::milliseconds(250);
  options.allreduce.sender_timeout = std::chrono::seconds(60);
  options.allreduce.reducer_timeout = std::chrono::seconds(90);
  swarm_ = std::make_unique<swarm::SwarmAverager>(peer_->mailbox(), peer_->allreduce(),
                                                  &peer_->matchmaker(), &peer_->dht(),
                                                  std::move(launch), std::move(options));
  thread_ = std::thread([this] { RunLoop(); });
  init();
}

HivemindBackend::~HivemindBackend() {
  std::deque<Op> abandoned;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    abandoned.swap(queue_);
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (Op& op : abandoned) {
    try {
      Fail(op.name + " was never run: the process group was destroyed");
    } catch (...) {
      op.work->Fail(std::current_exception());
    }
  }
}

int HivemindBackend::swarm_group_size() const { return group_size_.load(); }

uint64_t HivemindBackend::getSequenceNumberForGroup() {
  std::lock_guard<std::mutex> lock(mutex_);
  return issued_;
}

// ---- the operation queue ----

std::chrono::milliseconds HivemindBackend::Timeout(std::chrono::milliseconds requested) const {
  return requested.count() > 0 ? requested : timeout_;
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::Enqueue(
    c10d::OpType type, const char* title, std::string name, std::vector<at::Tensor> outputs,
    std::chrono::milliseconds timeout,
    std::function<void(const std::string&, Clock::time_point)> body) {
  auto work = c10::make_intrusive<HivemindWork>(getRank(), type, title, std::move(outputs));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Check(!stopping_, "the process group is shut down");
    queue_.push_back(Op{work, std::move(body), Timeout(timeout), std::move(name)});
    ++issued_;
  }
  wake_.notify_one();
  return work;
}

void HivemindBackend::RunLoop() {
  while (true) {
    Op op;
    uint64_t seq = 0;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      op = std::move(queue_.front());
      queue_.pop_front();
      seq = next_seq_++;
    }
    const Clock::time_point deadline = Clock::now() + op.timeout;
    const std::string key = launch_id_ + "/" + std::to_string(seq);
    std::exception_ptr error;
    try {
      op.body(key, deadline);
    } catch (...) {
      error = std::current_exception();
    }
    const auto& group = swarm_->group();
    group_size_ = group ? static_cast<int>(group->members.size()) : 0;
    if (error) {
      op.work->Fail(error);
    } else {
      op.work->Complete();
    }
  }
}

// ---- point to point within the launch ----

std::string HivemindBackend::DescribeRank(int rank) const {
  return "rank " + std::to_string(rank) + " (peer " + ranks_[rank].peer_id.ShortString() + ")";
}

Future<net::Message> HivemindBackend::SendTo(int rank, const std::string& key,
                                             const at::Tensor& tensor, Clock::time_point deadline) {
  return peer_->mailbox().SendAsync(ranks_[rank], key, {TensorPayload(tensor)}, deadline);
}

void HivemindBackend::WaitSent(int rank, Future<net::Message>& sent) {
  const Status& status = sent.Wait().status();
  if (!status.ok()) Fail("sending to " + DescribeRank(rank) + " failed: " + status.ToString());
}

void HivemindBackend::WaitExchanged(std::vector<Future<net::Message>>& sends) {
  // Called once everything this rank needed has arrived from every other rank, so each of them
  // was alive for this op. An unconfirmed send then only means that rank finished first and
  // exited before its reply left; if it really missed the data, its own op fails and says so.
  for (int r = 0; r < getSize(); ++r) {
    if (r == getRank() || !sends[r].valid()) continue;
    const Status& status = sends[r].Wait().status();
    if (!status.ok()) {
      HM_LOG(kInfo) << "hivemind: " << DescribeRank(r)
                    << " did not confirm receipt: " << status.ToString();
    }
  }
}

net::Payload HivemindBackend::ReceiveFrom(int rank, const std::string& key,
                                          Clock::time_point deadline) {
  auto message = peer_->mailbox().Receive(ranks_[rank], key, deadline);
  if (!message.ok()) {
    Fail("receiving from " + DescribeRank(rank) + " failed: " + message.status().ToString());
  }
  if (message->payloads.size() != 1) Fail(DescribeRank(rank) + " sent a malformed message");
  return std::move(message->payloads.front());
}

namespace {

// The payload as a tensor shaped like `like`, or a clear error when the sizes disagree.
at::Tensor Expect(const net::Payload& payload, const at::Tensor& like, const std::string& from) {
  if (payload.size() != like.nbytes()) {
    Fail(from + " sent " + std::to_string(payload.size()) + " bytes where " +
         std::to_string(like.nbytes()) + " were expected (" + std::to_string(like.numel()) +
         " elements of " + std::string(c10::toString(like.scalar_type())) +
         "): do all ranks pass tensors of the same shape and dtype?");
  }
  return PayloadTensor(payload, like);
}

}  // namespace

// ---- collectives among the launch's ranks ----

c10::intrusive_ptr<c10d::Work> HivemindBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                          const c10d::BroadcastOptions& opts) {
  Check(tensors.size() == 1, "broadcast takes one tensor per rank");
  CheckDense(tensors[0], "the broadcast tensor");
  const int root = static_cast<int>(opts.rootRank);
  Check(root >= 0 && root < getSize(), "broadcast root " + std::to_string(root) + " is not a rank");
  at::Tensor tensor = tensors[0];
  return Enqueue(c10d::OpType::BROADCAST, "hivemind:broadcast", "broadcast", {tensor}, opts.timeout,
                 [this, tensor, root](const std::string& key, Clock::time_point deadline) mutable {
                   if (getRank() == root) {
                     std::vector<Future<net::Message>> sends(getSize());
                     for (int r = 0; r < getSize(); ++r) {
                       if (r != root) sends[r] = SendTo(r, key, tensor, deadline);
                     }
                     for (int r = 0; r < getSize(); ++r) {
                       if (r != root) WaitSent(r, sends[r]);
                     }
                   } else {
                     net::Payload payload = ReceiveFrom(root, key, deadline);
                     CopyInto(tensor, Expect(payload, tensor, DescribeRank(root)));
                   }
                 });
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::allgather(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  Check(inputs.size() == 1 && outputs.size() == 1, "allgather takes one tensor per rank");
  Check(static_cast<int>(outputs[0].size()) == getSize(),
        "allgather needs " + std::to_string(getSize()) + " output tensors, got " +
            std::to_string(outputs[0].size()));
  CheckDense(inputs[0], "the allgather input");
  for (const auto& out : outputs[0]) {
    Check(out.numel() == inputs[0].numel() && out.scalar_type() == inputs[0].scalar_type(),
          "allgather outputs must match the input's size and dtype");
  }
  at::Tensor input = inputs[0];
  std::vector<at::Tensor> outs = outputs[0];
  return Enqueue(c10d::OpType::ALLGATHER, "hivemind:all_gather", "allgather", outs, opts.timeout,
                 [this, input, outs](const std::string& key, Clock::time_point deadline) mutable {
                   std::vector<Future<net::Message>> sends(getSize());
                   for (int r = 0; r < getSize(); ++r) {
                     if (r != getRank()) sends[r] = SendTo(r, key, input, deadline);
                   }
                   for (int r = 0; r < getSize(); ++r) {
                     if (r == getRank()) {
                       CopyInto(outs[r], input);
                     } else {
                       net::Payload payload = ReceiveFrom(r, key, deadline);
                       CopyInto(outs[r], Expect(payload, input, DescribeRank(r)));
                     }
                   }
                   WaitExchanged(sends);
                 });
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::_allgather_base(
    at::Tensor& output, at::Tensor& input, const c10d::AllgatherOptions& opts) {
  CheckDense(input, "the allgather input");
  Check(output.numel() == input.numel() * getSize() && output.scalar_type() == input.scalar_type(),
        "the allgather output must hold world_size times the input, of the same dtype");
  Check(output.is_contiguous(), "the allgather output must be contiguous");
  std::vector<std::vector<at::Tensor>> outs(1);
  for (const at::Tensor& chunk : output.view(-1).split(input.numel())) outs[0].push_back(chunk);
  std::vector<at::Tensor> ins = {input};
  return allgather(outs, ins, opts);
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::allgather_into_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  Check(outputs.size() == inputs.size(), "as many outputs as inputs are needed");
  // Operations run in order, so the last one completing means all did.
  c10::intrusive_ptr<c10d::Work> last;
  for (size_t i = 0; i < inputs.size(); ++i) last = _allgather_base(outputs[i], inputs[i], opts);
  return last ? last : barrier(c10d::BarrierOptions());
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::gather(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::GatherOptions& opts) {
  Check(inputs.size() == 1, "gather takes one input tensor");
  CheckDense(inputs[0], "the gather input");
  const int root = static_cast<int>(opts.rootRank);
  Check(root >= 0 && root < getSize(), "gather root " + std::to_string(root) + " is not a rank");
  std::vector<at::Tensor> outs;
  if (getRank() == root) {
    Check(outputs.size() == 1 && static_cast<int>(outputs[0].size()) == getSize(),
          "the gather root needs world_size output tensors");
    outs = outputs[0];
  } else {
    Check(outputs.empty() || outputs[0].empty(), "only the gather root takes output tensors");
  }
  at::Tensor input = inputs[0];
  return Enqueue(
      c10d::OpType::GATHER, "hivemind:gather", "gather", outs, opts.timeout,
      [this, input, outs, root](const std::string& key, Clock::time_point deadline) mutable {
        if (getRank() != root) {
          auto sent = SendTo(root, key, input, deadline);
          WaitSent(root, sent);
          return;
        }
        for (int r = 0; r < getSize(); ++r) {
          if (r == root) {
            CopyInto(outs[r], input);
          } else {
            CopyInto(outs[r], Expect(ReceiveFrom(r, key, deadline), outs[r], DescribeRank(r)));
          }
        }
      });
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::scatter(
    std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ScatterOptions& opts) {
  Check(outputs.size() == 1, "scatter takes one output tensor");
  CheckDense(outputs[0], "the scatter output");
  const int root = static_cast<int>(opts.rootRank);
  Check(root >= 0 && root < getSize(), "scatter root " + std::to_string(root) + " is not a rank");
  std::vector<at::Tensor> ins;
  if (getRank() == root) {
    Check(inputs.size() == 1 && static_cast<int>(inputs[0].size()) == getSize(),
          "the scatter root needs world_size input tensors");
    ins = inputs[0];
  }
  at::Tensor output = outputs[0];
  return Enqueue(
      c10d::OpType::SCATTER, "hivemind:scatter", "scatter", {output}, opts.timeout,
      [this, ins, output, root](const std::string& key, Clock::time_point deadline) mutable {
        if (getRank() != root) {
          CopyInto(output, Expect(ReceiveFrom(root, key, deadline), output, DescribeRank(root)));
          return;
        }
        std::vector<Future<net::Message>> sends(getSize());
        for (int r = 0; r < getSize(); ++r) {
          if (r != root) sends[r] = SendTo(r, key, ins[r], deadline);
        }
        CopyInto(output, ins[root]);
        for (int r = 0; r < getSize(); ++r) {
          if (r != root) WaitSent(r, sends[r]);
        }
      });
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::reduce(std::vector<at::Tensor>& tensors,
                                                       const c10d::ReduceOptions& opts) {
  Check(tensors.size() == 1, "reduce takes one tensor per rank");
  CheckDense(tensors[0], "the reduce tensor");
  CheckOp(opts.reduceOp);
  const int root = static_cast<int>(opts.rootRank);
  Check(root >= 0 && root < getSize(), "reduce root " + std::to_string(root) + " is not a rank");
  at::Tensor tensor = tensors[0];
  const auto op = opts.reduceOp.op_;
  return Enqueue(
      c10d::OpType::REDUCE, "hivemind:reduce", "reduce", {tensor}, opts.timeout,
      [this, tensor, root, op](const std::string& key, Clock::time_point deadline) mutable {
        if (getRank() != root) {
          auto sent = SendTo(root, key, tensor, deadline);
          WaitSent(root, sent);
          return;
        }
        std::vector<net::Payload> keep;
        std::vector<at::Tensor> inputs;
        for (int r = 0; r < getSize(); ++r) {
          if (r == root) {
            inputs.push_back(tensor.to(at::kCPU).contiguous());
          } else {
            keep.push_back(ReceiveFrom(r, key, deadline));
            inputs.push_back(Expect(keep.back(), tensor, DescribeRank(r)));
          }
        }
        CopyInto(tensor, Combine(inputs, op));
      });
}

void HivemindBackend::ReduceScatterNow(const std::string& key, at::Tensor& output,
                                       const std::vector<at::Tensor>& chunks, c10d::ReduceOp op,
                                       Clock::time_point deadline) {
  std::vector<Future<net::Message>> sends(getSize());
  for (int r = 0; r < getSize(); ++r) {
    if (r != getRank()) sends[r] = SendTo(r, key, chunks[r], deadline);
  }
  std::vector<net::Payload> keep;
  std::vector<at::Tensor> inputs;
  for (int r = 0; r < getSize(); ++r) {
    if (r == getRank()) {
      inputs.push_back(chunks[r].to(at::kCPU).contiguous().view(output.sizes()));
    } else {
      keep.push_back(ReceiveFrom(r, key, deadline));
      inputs.push_back(Expect(keep.back(), output, DescribeRank(r)));
    }
  }
  CopyInto(output, Combine(inputs, op.op_));
  WaitExchanged(sends);
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::reduce_scatter(
    std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ReduceScatterOptions& opts) {
  Check(outputs.size() == 1 && inputs.size() == 1, "reduce_scatter takes one output per rank");
  Check(static_cast<int>(inputs[0].size()) == getSize(),
        "reduce_scatter needs world_size input tensors");
  CheckDense(outputs[0], "the reduce_scatter output");
  CheckOp(opts.reduceOp);
  for (const auto& in : inputs[0]) {
    Check(in.numel() == outputs[0].numel() && in.scalar_type() == outputs[0].scalar_type(),
          "reduce_scatter inputs must match the output's size and dtype");
  }
  at::Tensor output = outputs[0];
  std::vector<at::Tensor> chunks = inputs[0];
  const c10d::ReduceOp op = opts.reduceOp;
  return Enqueue(
      c10d::OpType::REDUCE_SCATTER, "hivemind:reduce_scatter", "reduce_scatter", {output},
      opts.timeout,
      [this, output, chunks, op](const std::string& key, Clock::time_point deadline) mutable {
        ReduceScatterNow(key, output, chunks, op, deadline);
      });
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::_reduce_scatter_base(
    at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) {
  Check(input.numel() == output.numel() * getSize() && input.scalar_type() == output.scalar_type(),
        "the reduce_scatter input must hold world_size times the output, of the same dtype");
  std::vector<std::vector<at::Tensor>> ins(1);
  for (const at::Tensor& chunk : input.contiguous().view(-1).split(output.numel())) {
    ins[0].push_back(chunk);
  }
  std::vector<at::Tensor> outs = {output};
  return reduce_scatter(outs, ins, opts);
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::alltoall(std::vector<at::Tensor>& outputs,
                                                         std::vector<at::Tensor>& inputs,
                                                         const c10d::AllToAllOptions& opts) {
  Check(
      static_cast<int>(outputs.size()) == getSize() && static_cast<int>(inputs.size()) == getSize(),
      "alltoall needs world_size input and output tensors");
  std::vector<at::Tensor> outs = outputs;
  std::vector<at::Tensor> ins = inputs;
  return Enqueue(c10d::OpType::ALLTOALL, "hivemind:all_to_all", "alltoall", outs, opts.timeout,
                 [this, outs, ins](const std::string& key, Clock::time_point deadline) mutable {
                   std::vector<Future<net::Message>> sends(getSize());
                   for (int r = 0; r < getSize(); ++r) {
                     if (r != getRank()) sends[r] = SendTo(r, key, ins[r], deadline);
                   }
                   for (int r = 0; r < getSize(); ++r) {
                     if (r == getRank()) {
                       CopyInto(outs[r], ins[r]);
                     } else {
                       CopyInto(outs[r],
                                Expect(ReceiveFrom(r, key, deadline), outs[r], DescribeRank(r)));
                     }
                   }
                   WaitExchanged(sends);
                 });
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                              std::vector<int64_t>& output_splits,
                                                              std::vector<int64_t>& input_splits,
                                                              const c10d::AllToAllOptions& opts) {
  auto split = [this](const at::Tensor& tensor, const std::vector<int64_t>& sizes,
                      const char* what) {
    Check(tensor.dim() >= 1, std::string(what) + " must have at least one dimension");
    std::vector<int64_t> rows = sizes;
    if (rows.empty()) {
      Check(tensor.size(0) % getSize() == 0,
            std::string(what) + "'s first dimension must divide by world_size");
      rows.assign(getSize(), tensor.size(0) / getSize());
    }
    Check(static_cast<int>(rows.size()) == getSize(),
          std::string(what) + " split sizes must have world_size entries");
    return tensor.split_with_sizes(rows, 0);
  };
  std::vector<at::Tensor> outs = split(output, output_splits, "the alltoall output");
  std::vector<at::Tensor> ins = split(input, input_splits, "the alltoall input");
  return alltoall(outs, ins, opts);
}

// ---- point to point ----

c10::intrusive_ptr<c10d::Work> HivemindBackend::send(std::vector<at::Tensor>& tensors, int dst,
                                                     int tag) {
  Check(tensors.size() == 1, "send takes one tensor");
  Check(dst >= 0 && dst < getSize() && dst != getRank(),
        "send destination " + std::to_string(dst) + " is not another rank");
  uint64_t index;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    index = sends_[{dst, tag}]++;
  }
  const std::string key = launch_id_ + "/p2p/" + std::to_string(getRank()) + ">" +
                          std::to_string(dst) + "/" + std::to_string(tag) + "/" +
                          std::to_string(index);
  at::Tensor tensor = tensors[0];
  return Enqueue(c10d::OpType::SEND, "hivemind:send", "send", {tensor}, c10d::kUnsetTimeout,
                 [this, tensor, dst, key](const std::string&, Clock::time_point deadline) {
                   auto sent = SendTo(dst, key, tensor, deadline);
                   WaitSent(dst, sent);
                 });
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::recv(std::vector<at::Tensor>& tensors, int src,
                                                     int tag) {
  Check(tensors.size() == 1, "recv takes one tensor");
  Check(src >= 0 && src < getSize() && src != getRank(),
        "recv source " + std::to_string(src) + " is not another rank");
  uint64_t index;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    index = receives_[{src, tag}]++;
  }
  const std::string key = launch_id_ + "/p2p/" + std::to_string(src) + ">" +
                          std::to_string(getRank()) + "/" + std::to_string(tag) + "/" +
                          std::to_string(index);
  at::Tensor tensor = tensors[0];
  return Enqueue(c10d::OpType::RECV, "hivemind:recv", "recv", {tensor}, c10d::kUnsetTimeout,
                 [this, tensor, src, key](const std::string&, Clock::time_point deadline) mutable {
                   CopyInto(tensor,
                            Expect(ReceiveFrom(src, key, deadline), tensor, DescribeRank(src)));
                 });
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::barrier(const c10d::BarrierOptions& opts) {
  return Enqueue(c10d::OpType::BARRIER, "hivemind:barrier", "barrier", {}, opts.timeout,
                 [this](const std::string& key, Clock::time_point deadline) {
                   // Completes among the live ranks: a rank that is gone cannot be waited for.
                   at::Tensor empty = at::empty({0}, at::kByte);
                   std::vector<Future<net::Message>> sends(getSize());
                   for (int r = 0; r < getSize(); ++r) {
                     if (r != getRank()) sends[r] = SendTo(r, key, empty, deadline);
                   }
                   for (int r = 0; r < getSize(); ++r) {
                     if (r == getRank()) continue;
                     auto got = peer_->mailbox().Receive(ranks_[r], key, deadline);
                     const Status& sent = sends[r].Wait().status();
                     if (got.ok() && sent.ok()) continue;
                     const Status& why = got.ok() ? sent : got.status();
                     if (why.code() != StatusCode::kUnavailable) {
                       Fail("barrier: " + DescribeRank(r) + " did not arrive: " + why.ToString());
                     }
                     HM_LOG(kWarning) << "hivemind barrier: " << DescribeRank(r)
                                      << " is gone; completing without it: " << why.ToString();
                   }
                 });
}

// ---- all-reduce over the swarm ----

c10::intrusive_ptr<c10d::Work> HivemindBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                          const c10d::AllreduceOptions& opts) {
  Check(tensors.size() == 1, "allreduce takes one tensor per rank");
  c10d::AllreduceCoalescedOptions coalesced;
  coalesced.reduceOp = opts.reduceOp;
  coalesced.timeout = opts.timeout;
  return allreduce_coalesced(tensors, coalesced);
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::allreduce_coalesced(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) {
  Check(!tensors.empty(), "allreduce needs at least one tensor");
  for (const auto& tensor : tensors) CheckDense(tensor, "the allreduce tensor");
  CheckOp(opts.reduceOp);
  std::vector<at::Tensor> list = tensors;
  const c10d::ReduceOp op = opts.reduceOp;
  return Enqueue(c10d::OpType::ALLREDUCE, "hivemind:all_reduce", "allreduce", list, opts.timeout,
                 [this, list, op](const std::string&, Clock::time_point deadline) mutable {
                   AllReduceNow(list, op, deadline);
                 });
}

namespace {

// What kind of all-reduce this is: regrouping waits for the op that started the first group.
std::string Signature(const char* kind, const std::vector<at::Tensor>& tensors, int op) {
  std::string signature = std::string(kind) + "/" + std::to_string(op);
  for (const auto& tensor : tensors) {
    signature += "/" + std::string(c10::toString(tensor.scalar_type())) + ":" +
                 std::to_string(tensor.numel());
  }
  return signature.size() > 200 ? signature.substr(0, 200) : signature;
}

// A newcomer's weight until its state is synced: its gradients (computed on stale parameters)
// change nothing, yet the group still works if every member is a newcomer.
constexpr float kNewcomerWeight = 1e-30f;

// Flat buffers from this size on are filled with non-temporal stores (see MeanAllReduce).
constexpr size_t kStreamedCopyBytes = size_t{8} << 20;

}  // namespace

float HivemindBackend::Weight() const { return established_ ? 1.0f : kNewcomerWeight; }

void HivemindBackend::set_joining() {
  established_ = false;
  swarm_->SetJoining();
}

c10::intrusive_ptr<c10d::Work> HivemindBackend::sync_state(std::vector<at::Tensor> tensors) {
  for (const auto& tensor : tensors) {
    CheckDense(tensor, "a state tensor");
    Check(MeanFriendly(tensor), "state tensors must be floating point, got " +
                                    std::string(c10::toString(tensor.scalar_type())));
  }
  return Enqueue(
      c10d::OpType::ALLREDUCE, "hivemind:sync_state", "sync_state", tensors, c10d::kUnsetTimeout,
      [this, tensors](const std::string&, Clock::time_point deadline) mutable {
        int64_t total = 0;
        for (const auto& tensor : tensors) total += tensor.numel();
        std::vector<float> data(static_cast<size_t>(total) + 1);
        data.reserve(data.size() + 1);  // Mean appends the regroup vote
        at::Tensor flat = at::from_blob(data.data(), {total + 1}, at::kFloat);
        int64_t offset = 0;
        for (const auto& tensor : tensors) {
          flat.narrow(0, offset, tensor.numel()).copy_(tensor.reshape({-1}));
          offset += tensor.numel();
        }
        // The last element: the weighted share of established members (> 0.5 when
        // anyone in the group was established).
        data.back() = established_ ? 1.0f : 0.0f;
        auto report = swarm_->Mean(data, deadline, Signature("sync", tensors, 0), Weight());
        if (!report.ok()) Fail("state sync failed: " + report.status().ToString());
        flat = at::from_blob(data.data(), {total + 1}, at::kFloat);  // Mean may move the storage
        offset = 0;
        for (auto& tensor : tensors) {
          tensor.copy_(flat.narrow(0, offset, tensor.numel()).view(tensor.sizes()));
          offset += tensor.numel();
        }
        if (data.back() > 0.5f) established_ = true;
      });
}

void HivemindBackend::AllReduceNow(std::vector<at::Tensor>& tensors, c10d::ReduceOp op,
                                   Clock::time_point deadline) {
  const bool mean = op == c10d::ReduceOp::SUM || op == c10d::ReduceOp::AVG;
  if (mean && std::all_of(tensors.begin(), tensors.end(), MeanFriendly)) {
    MeanAllReduce(tensors, op, deadline);
  } else {
    GatherAllReduce(tensors, op, deadline);
  }
}

// Floating-point SUM/AVG: the fault-tolerant butterfly mean of the swarm group. SUM is
// world_size × the mean over the contributors: each contributor scales its tensor by the size of
// its own launch, which is the plain sum when every rank of one launch contributes.
void HivemindBackend::MeanAllReduce(std::vector<at::Tensor>& tensors, c10d::ReduceOp op,
                                    Clock::time_point deadline) {
  int64_t total = 0;
  for (const auto& tensor : tensors) total += tensor.numel();
  // One extra element: the share of members whose values were not finite (see below).
  std::vector<float>& data = mean_buffer_;
  ReserveOnHugePages(data, static_cast<size_t>(total) + 2);  // Mean appends the regroup vote
  data.resize(static_cast<size_t>(total) + 1);
  data.back() = 0.0f;
  at::Tensor flat = at::from_blob(data.data(), {total}, at::kFloat);
  const double scale = op == c10d::ReduceOp::SUM ? getSize() : 1.0;
  // Tensors large enough travel compressed (the flag element never is). The wire is float32
  // whatever the tensor's dtype, hence kFloat32 for the choice.
  const auto policy = averaging::CodecPolicy::AllRoles(compression_);
  std::vector<averaging::CodecRange> codecs;
  std::atomic<bool> finite{true};
  int64_t offset = 0;
  for (const auto& tensor : tensors) {
    float* target = data.data() + offset;
    if (tensor.device().is_cpu() && tensor.scalar_type() == at::kFloat && tensor.is_contiguous()) {
      // DDP's gradient buckets: copied, scaled and checked in one pass (three with torch's ops),
      // on torch's intra-op threads as its copy would be. Scaled in float, as mul_ does.
      // A flat buffer far larger than the caches is written past them (the round reads it from
      // memory anyway): a plain copy would first read each line it writes.
      const float* source = tensor.const_data_ptr<float>();
      const auto copy = total * sizeof(float) >= kStreamedCopyBytes
                            ? averaging::ScaledCopyFiniteStreaming
                            : averaging::ScaledCopyFinite;
      at::parallel_for(0, tensor.numel(), at::internal::GRAIN_SIZE,
                       [&](int64_t begin, int64_t end) {
                         if (!copy(source + begin, static_cast<size_t>(end - begin),
                                   static_cast<float>(scale), target + begin)) {
                           finite = false;
                         }
                       });
    } else {
      at::Tensor slice = flat.narrow(0, offset, tensor.numel());
      slice.copy_(tensor.reshape({-1}));
      if (scale != 1.0) slice.mul_(scale);
      if (!averaging::AllFinite(target, static_cast<size_t>(tensor.numel()))) finite = false;
    }
    averaging::CodecSpec spec = averaging::ChooseCodec(static_cast<uint64_t>(tensor.numel()),
                                                       averaging::TensorRole::kGradient, policy);
    if (spec.id != averaging::CodecId::kNone) {
      codecs.push_back({static_cast<size_t>(offset), static_cast<size_t>(tensor.numel()), spec});
    }
    offset += tensor.numel();
  }
  // The all-reduce refuses non-finite values (an outsider must not be able to poison the mean),
  // yet AMP's GradScaler relies on an overflow anywhere reaching everyone. So a member with
  // inf/NaN sends zeros and raises the flag, and everyone's result becomes NaN.
  if (!finite) {
    flat.zero_();
    data[static_cast<size_t>(total)] = 1.0f;
  }
  // Shared: the mean is copied once, straight into the tensors. Checked above, so the round
  // does not check again. A single float32 tensor (a DDP bucket) is the round's mirror: results
  // land there while they are in the cache instead of in a cold copy at the end.
  float* mirror = nullptr;
  if (tensors.size() == 1 && tensors[0].device().is_cpu() &&
      tensors[0].scalar_type() == at::kFloat && tensors[0].is_contiguous()) {
    mirror = tensors[0].mutable_data_ptr<float>();
  }
  auto report = swarm_->MeanShared(data, deadline, Signature("mean", tensors, op.op_), Weight(),
                                   std::move(codecs), /*input_checked=*/true, mirror,
                                   mirror ? static_cast<size_t>(total) : 0);
  if (!report.ok()) Fail("allreduce failed: " + report.status().ToString());
  const std::vector<float>& mean = *report->mean;
  if (mean[static_cast<size_t>(total)] > 0.0f) {
    for (auto& tensor : tensors) tensor.fill_(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  if (report->mirrored) return;
  // from_blob wants a mutable pointer; nothing writes through this view.
  at::Tensor result = at::from_blob(const_cast<float*>(mean.data()), {total}, at::kFloat);
  offset = 0;
  for (auto& tensor : tensors) {
    tensor.copy_(result.narrow(0, offset, tensor.numel()).view(tensor.sizes()));
    offset += tensor.numel();
  }
}

// Everything else (MIN/MAX/PRODUCT, bitwise ops, integer tensors): every member sends its tensors
// to all and reduces them in group order, exactly. A member that fails fails the op.
void HivemindBackend::GatherAllReduce(std::vector<at::Tensor>& tensors, c10d::ReduceOp op,
                                      Clock::time_point deadline) {
  std::vector<at::Tensor> flat_parts;
  for (const auto& tensor : tensors) flat_parts.push_back(tensor.to(at::kCPU).reshape({-1}));
  at::Tensor mine = tensors.size() == 1 ? flat_parts[0].contiguous() : at::cat(flat_parts);
  auto gathered =
      swarm_->AllGather(TensorPayload(mine), deadline, Signature("gather", tensors, op.op_));
  if (!gathered.ok()) Fail("allreduce failed: " + gathered.status().ToString());
  const swarm::SwarmGroup& group = gathered->first;
  std::vector<at::Tensor> inputs;
  bool plain_sum = true;
  for (size_t i = 0; i < group.members.size(); ++i) {
    const net::Payload& payload = gathered->second[i];
    inputs.push_back(Expect(payload, mine, group.members[i].Describe()));
    plain_sum = plain_sum && group.members[i].launch_size == static_cast<int>(group.members.size());
  }
  at::Tensor result;
  if (op == c10d::ReduceOp::SUM && !plain_sum) {
    // Ranks missing, or launches of different sizes: world_size × mean of (launch size × x).
    at::Tensor acc = at::zeros_like(mine, at::kDouble);
    for (size_t i = 0; i < inputs.size(); ++i) {
      acc.add_(inputs[i].to(at::kDouble), group.members[i].launch_size);
    }
    acc.div_(static_cast<double>(inputs.size()));
    result =
        (at::isIntegralType(mine.scalar_type(), true) ? acc.round() : acc).to(mine.scalar_type());
  } else {
    result = Combine(inputs, op.op_);
  }
  int64_t offset = 0;
  for (auto& tensor : tensors) {
    tensor.copy_(result.narrow(0, offset, tensor.numel()).view(tensor.sizes()));
    offset += tensor.numel();
  }
}

}  // namespace hivemind::c10d_backend
