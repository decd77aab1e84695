#!/usr/bin/env python3
"""The hivemind_backend demo: a swarm of independent DDP launches that survives a peer's death.

    python3 examples/swarm_digits.py                        # the demo (backend "hivemind")
    python3 examples/swarm_digits.py --backend gloo --no-kill   # same training on Gloo, one launch

What it does (default):
  1. starts a bootstrap DHT node in this process (hivemind_backend.DHT);
  2. launches 4 peers, each its own process and its own c10d launch (rank 0, world_size 1, its own
     tcp:// store), which find each other through the DHT: HIVEMIND_INITIAL_PEERS = the bootstrap's
     address, HIVEMIND_RUN_ID = "digits-demo", HIVEMIND_MIN_GROUP_SIZE = 4;
  3. each peer trains the same small MLP, wrapped in DistributedDataParallel, on its own shard of
     scikit-learn's digits; DDP's all_reduce(SUM) over the swarm gives every peer the swarm-mean
     gradient, so all peers take identical optimizer steps;
  4. once peer3 reports step --kill-at-step, this process SIGKILLs it; the 3 survivors keep
     training without it;
  5. each survivor evaluates its accuracy on the test split and prints a checksum of its
     parameters; this process prints a summary and exits 0 only if every survivor finished with
     accuracy >= --min-accuracy and the survivors' parameters are bitwise identical.

Every wait has a deadline (--timeout): a stalled peer makes the demo fail with a message, after
killing every child, instead of hanging.

With --backend gloo (development, and the reference), Gloo cannot form a swarm of independent
launches, so the 4 peers are one launch of 4 ranks sharing one tcp:// store; no peer is killed.

Exit codes: 0 passed; 1 a check failed (accuracy, parameters, a peer crashed); 2 timeout.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

RUN_ID = "digits-demo"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"  # the demo's whole swarm lives on this machine
STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")
RESULT_LINE = re.compile(r"^RESULT accuracy=(\S+) checksum=(\S+) steps=(\d+) swarm=(\S+)$")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train on scikit-learn digits with DDP over a hivemind swarm; kill a peer "
        "mid-way; check the survivors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--backend", default="hivemind", choices=["hivemind", "gloo"],
                        help="c10d backend of every peer")
    parser.add_argument("--peers", type=int, default=4, help="peer processes to launch")
    parser.add_argument("--steps", type=int, default=100, help="training steps per peer")
    parser.add_argument("--kill-at-step", type=int, default=40,
                        help="SIGKILL the last peer once it reports this step")
    parser.add_argument("--no-kill", action="store_true", help="let every peer finish")
    parser.add_argument("--log-every", type=int, default=10,
                        help="progress line (and swarm-size probe) every this many steps")
    parser.add_argument("--batch-size", type=int, default=32, help="per peer")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="model init seed, same on all peers")
    parser.add_argument("--min-accuracy", type=float, default=0.9,
                        help="pass bound on every survivor's test accuracy")
    parser.add_argument("--matchmaking-time", type=float, default=None,
                        help="HIVEMIND_MATCHMAKING_TIME for the peers, seconds (default: the "
                        "backend's own)")
    parser.add_argument("--op-timeout", type=float, default=30.0,
                        help="c10d timeout of every collective (init_process_group(timeout=))")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline of the whole demo, seconds")
    # Internal: the parent re-runs this script with these to start one peer.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--init-method", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--peer-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    if args.log_every < 1 or args.steps < args.log_every:
        parser.error("need 1 <= --log-every <= --steps")
    if not args.worker and not args.no_kill:  # the kill is the parent's business
        if args.backend == "gloo":
            parser.error("--backend gloo needs --no-kill: a Gloo job cannot survive a dead rank")
        if not 0 < args.kill_at_step < args.steps:
            parser.error("--kill-at-step must be between 0 and --steps")
    return args


# -------------------------------------------------------------------------------------------------
# One peer (a child process).

def prepare_data(path: str) -> None:
    """Writes the fixed train/test split of scikit-learn's digits to `path` (.npz).

    Done once in the parent so that the 4 peers need not import scikit-learn (about a second of CPU
    each, which adds up on a 2-core machine).
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def load_shard(path: str, peer_index: int, num_peers: int):
    """(train inputs, train labels) of this peer's shard, and the whole test split.

    Peer i takes every num_peers-th training example starting at i: the shards are disjoint and
    cover the training split.
    """
    import numpy as np
    import torch

    data = np.load(path)
    shard = slice(peer_index, None, num_peers)
    return (torch.from_numpy(data["x_train"][shard]), torch.from_numpy(data["y_train"][shard]),
            torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]))


def param_checksum(model) -> str:
    """sha256 of the parameters' bytes: equal only if the parameters are bitwise identical."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def probe_swarm_size(num_peers: int, peer_index: int) -> int:
    """How many peers contributed to one all_reduce, inferred from its result.

    Each peer puts 1 in its own slot. With Gloo (one launch of num_peers ranks) SUM gives 1 in every
    live slot. With hivemind (launches of world_size 1) SUM = 1 x mean over the contributors, i.e.
    1/k in each of the k contributors' slots. Either way the non-zero slots are the contributors.
    """
    import torch
    import torch.distributed as dist

    slots = torch.zeros(num_peers)
    slots[peer_index] = 1.0
    dist.all_reduce(slots, op=dist.ReduceOp.SUM)
    return int((slots != 0).sum())


def run_worker(args) -> int:
    import datetime

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    if args.backend == "hivemind":
        import hivemind_backend  # noqa: F401  (registers the "hivemind" backend)

    # 4 peers share 2 cores on the test machines: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    dist.init_process_group(args.backend, init_method=args.init_method, rank=args.rank,
                            world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=args.op_timeout))

    x_train, y_train, x_test, y_test = load_shard(args.data, args.peer_index, args.peers)

    # DDP's construction broadcast only reaches the ranks of this launch (just this process with
    # hivemind), so identical initial weights across the swarm must come from the seed.
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    print(f"started: pid {os.getpid()}, {len(x_train)} training examples, initial parameters "
          f"sha256 {param_checksum(model)}", flush=True)

    # Batches differ per peer (own shard, own order); only the averaged gradients are shared.
    generator = torch.Generator().manual_seed(1000 + args.peer_index)
    order = torch.randperm(len(x_train), generator=generator)
    position = 0
    losses = []
    swarm = "?"
    for step in range(1, args.steps + 1):
        if position + args.batch_size > len(order):  # next epoch of this shard
            order = torch.randperm(len(x_train), generator=generator)
            position = 0
        batch = order[position:position + args.batch_size]
        position += args.batch_size

        optimizer.zero_grad()
        loss = loss_fn(ddp(x_train[batch]), y_train[batch])
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        losses.append(loss.item())

        if step % args.log_every == 0:
            swarm = probe_swarm_size(args.peers, args.peer_index)
            mean_loss = sum(losses) / len(losses)
            losses.clear()
            print(f"step {step}/{args.steps} loss {mean_loss:.4f} swarm {swarm}", flush=True)

    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"RESULT accuracy={accuracy:.4f} checksum={param_checksum(model)} steps={args.steps} "
          f"swarm={swarm}", flush=True)
    dist.barrier()  # Gloo: rank 0 hosts the store; keep it up until every rank is done
    dist.destroy_process_group()
    if args.backend == "gloo":
        # torch 2.13: once DDP has used a Gloo group, destroy_process_group leaves the group's
        # threads running, and one of them can free its last work item while Python finalizes,
        # which aborts the process ("terminate called without an active exception", about 1 run
        # in 15 here; see pytorch/pytorch PR 179291). Everything is done: skip the finalization.
        sys.stdout.flush()
        os._exit(0)
    return 0


# -------------------------------------------------------------------------------------------------
# The parent: bootstrap node, peer processes, the kill, the summary.

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Peer:
    """A peer process whose merged stdout/stderr lines go to a shared queue as (name, line);
    (name, None) marks the end of its output."""

    def __init__(self, name: str, command: list, env: dict, lines: queue.Queue):
        self.name = name
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1)
        self.last_step = 0
        self.result = None  # (accuracy, checksum, steps, swarm) from its RESULT line
        self.killed = False
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()

    def _pump(self, lines: queue.Queue) -> None:
        for line in self.process.stdout:
            lines.put((self.name, line.rstrip("\n")))
        lines.put((self.name, None))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # SIGKILL


def peer_commands(args, script: str):
    """(name, command line) of every peer. hivemind: independent launches; gloo: one launch."""
    common = ["--worker", "--backend", args.backend, "--peers", str(args.peers),
              "--steps", str(args.steps), "--log-every", str(args.log_every),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--seed", str(args.seed), "--op-timeout", str(args.op_timeout),
              "--data", args.data]
    shared_port = free_port()
    for index in range(args.peers):
        if args.backend == "hivemind":
            # Each peer is its own job: rank 0 of world_size 1 with a store of its own.
            launch = ["--init-method", f"tcp://127.0.0.1:{free_port()}", "--rank", "0",
                      "--world-size", "1"]
        else:
            launch = ["--init-method", f"tcp://127.0.0.1:{shared_port}", "--rank", str(index),
                      "--world-size", str(args.peers)]
        yield f"peer{index}", [sys.executable, script] + common + launch + [
            "--peer-index", str(index)]


def hivemind_unavailable() -> str:
    """"" when `import hivemind_backend` registers the "hivemind" c10d backend, else why not."""
    try:
        import hivemind_backend  # noqa: F401
    except ImportError as error:
        return f"cannot import hivemind_backend: {error}"
    import torch.distributed as dist

    if "hivemind" not in dist.Backend.backend_list:
        return "hivemind_backend is installed but registers no 'hivemind' c10d backend yet"
    return ""


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run_demo(args) -> int:
    started = time.monotonic()
    deadline = started + args.timeout
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    dht = None
    peers = {}
    workdir = tempfile.TemporaryDirectory(prefix="swarm_digits_")
    try:
        args.data = os.path.join(workdir.name, "digits.npz")
        prepare_data(args.data)
        if args.backend == "hivemind":
            problem = hivemind_unavailable()
            if problem:
                say(f"FAIL: {problem} (try --backend gloo --no-kill)")
                return 1
            import hivemind_backend

            dht = hivemind_backend.DHT(host_maddrs=[LOOPBACK], start=True)
            initial_peers = ",".join(dht.get_visible_maddrs())
            say(f"bootstrap DHT node: {initial_peers}")
            env.update(HIVEMIND_INITIAL_PEERS=initial_peers, HIVEMIND_RUN_ID=RUN_ID,
                       HIVEMIND_MIN_GROUP_SIZE=str(args.peers), HIVEMIND_HOST_MADDRS=LOOPBACK)
            if args.matchmaking_time is not None:
                env["HIVEMIND_MATCHMAKING_TIME"] = str(args.matchmaking_time)
            say(f"launching {args.peers} independent peers (run id {RUN_ID!r}, each rank 0 of "
                f"world_size 1 with its own tcp:// store)")
        else:
            say(f"launching one {args.backend} job of {args.peers} ranks (shared tcp:// store)")

        lines: queue.Queue = queue.Queue()
        script = os.path.abspath(__file__)
        for name, command in peer_commands(args, script):
            peers[name] = Peer(name, command, env, lines)
        victim = None if args.no_kill else peers[f"peer{args.peers - 1}"]

        code, problem = watch(args, peers, victim, lines, deadline)
        if problem:
            say(f"FAIL: {problem}")
            return code
        return summarize(args, peers, victim, time.monotonic() - started)
    finally:
        for peer in peers.values():
            peer.kill()
            peer.process.wait()
        if dht is not None:
            dht.shutdown()
        workdir.cleanup()


def watch(args, peers: dict, victim, lines: queue.Queue, deadline: float):
    """Relays the peers' output until every peer has exited; kills the victim on cue.
    Returns (0, "") or (exit code, the reason to fail)."""
    open_outputs = set(peers)
    while open_outputs:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stuck = ", ".join(f"{name} (at step {peers[name].last_step})"
                              for name in sorted(open_outputs))
            return 2, f"deadline of {args.timeout:g} s passed; still running: {stuck}"
        try:
            name, line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        peer = peers[name]
        if line is None:  # its output ended: it exited (or is about to)
            open_outputs.discard(name)
            try:
                code = peer.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return 2, f"{name} closed its output but did not exit before the deadline"
            if peer.killed:
                continue
            if code != 0:
                return 1, f"{name} exited with code {code} (its output is above)"
            if peer is victim:
                return 1, (f"{name} finished before it could be killed at step "
                           f"{args.kill_at_step}; raise --steps")
            continue
        print(f"[{name}] {line}", flush=True)

        step = STEP_LINE.match(line)
        if step:
            peer.last_step = int(step.group(1))
        result = RESULT_LINE.match(line)
        if result:
            peer.result = (float(result.group(1)), result.group(2), int(result.group(3)),
                           result.group(4))
        # The cue is a step the victim reported, not a time: the kill lands mid-training however
        # fast or slow the machine is.
        if peer is victim and not peer.killed and peer.last_step >= args.kill_at_step:
            peer.kill()
            peer.killed = True
            survivors = ", ".join(n for n in peers if peers[n] is not victim)
            say(f"SIGKILL {name} (pid {peer.process.pid}) after its step {peer.last_step}; "
                f"survivors {survivors} keep training")
    return 0, ""


def summarize(args, peers: dict, victim, elapsed: float) -> int:
    survivors = [peer for peer in peers.values() if peer is not victim]
    print("", flush=True)
    say("summary")
    say(f"backend {args.backend}, {len(peers)} peers launched, "
        + (f"{victim.name} killed by SIGKILL after step {victim.last_step}" if victim
           else "no peer killed") + f", {elapsed:.1f} s")
    problems = []
    for peer in survivors:
        if peer.result is None:
            problems.append(f"{peer.name} printed no result")
            continue
        accuracy, checksum, steps, swarm = peer.result
        say(f"{peer.name}: test accuracy {accuracy:.4f}, steps {steps}, parameters sha256 "
            f"{checksum}, swarm size at the end {swarm}")
        if accuracy < args.min_accuracy:
            problems.append(f"{peer.name} accuracy {accuracy:.4f} < {args.min_accuracy}")
    checksums = {peer.result[1] for peer in survivors if peer.result}
    identical = len(checksums) == 1 and all(peer.result for peer in survivors)
    say(f"parameters identical across survivors: {'yes' if identical else 'no'}")
    if not identical:
        problems.append(f"survivors' parameters differ ({len(checksums)} distinct checksums)")
    if problems:
        say("FAIL: " + "; ".join(problems))
        return 1
    say(f"PASS: {len(survivors)} survivors reached accuracy >= {args.min_accuracy} with "
        f"identical parameters")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    # Ctrl-C: leave through run_demo's finally, which kills the peers and stops the DHT.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
