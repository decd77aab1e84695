#!/usr/bin/env python3
"""DDP training speed with backend="hivemind" against backend="gloo" in the same run, on CPU.

    python3 benchmarks/benchmark_ddp.py [--backends gloo,hivemind] [--models mlp,cnn]
        [--ranks 2,4] [--warmup 10] [--steps 100] [--quick] [--no-death]

1. Steps per second. For every (model, ranks, backend): one real multi-process job, `ranks`
   processes of this script (--worker) sharing one tcp:// store (rank r of world_size `ranks`, as
   torchrun would start them), each training the model wrapped in DistributedDataParallel on
   synthetic digits-shaped batches (64 features for the MLP, 1x8x8 images for the CNN, batch 32 per
   rank). One torch thread per process, so that 4 ranks share the 2 cores of the test machines
   fairly. Warm-up steps are not timed; a job's speed is that of its slowest rank (DDP is
   synchronous, so they barely differ). With --hivemind-layout swarm, the hivemind job is instead
   `ranks` independent launches (rank 0 of world_size 1 each) that meet through the DHT.
   Gloo runs right before hivemind for every configuration.

2. Recovery from a peer's death (hivemind only; --no-death skips it): --death-peers independent
   launches (as in examples/swarm_digits.py) train the MLP and report the wall-clock time of every
   completed step; once every peer has completed --kill-at-step steps, the last one is SIGKILLed.
   Reported: the gap between the kill and the first step completed after it by every survivor
   (i.e. the slowest survivor's), next to the median step time before the kill.

hivemind runs need `import hivemind_backend` to register the "hivemind" backend. Every hivemind
peer gets HIVEMIND_HOST_MADDRS=/ip4/127.0.0.1/tcp/0 (and HIVEMIND_MATCHMAKING_TIME when
--matchmaking-time is given). A job of one launch needs nothing else (it starts its own swarm
through its store, like a Gloo job); a job of independent launches gets HIVEMIND_INITIAL_PEERS = a
bootstrap DHT node this process runs, a fresh HIVEMIND_RUN_ID and HIVEMIND_MIN_GROUP_SIZE = its
number of launches. Every job has a deadline (--timeout); a stalled job is killed and reported as
failed.

Exit codes: 0 done; 1 a job failed or timed out; 3 hivemind was asked for but is not available.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

MODELS = ("mlp", "cnn")
BATCH_SIZE = 32
LOOPBACK = "/ip4/127.0.0.1/tcp/0"  # every peer of these jobs lives on this machine
QUICK = dict(models="mlp", ranks="2", warmup=5, steps=30, death_peers=3, kill_at_step=10,
             steps_after_kill=10)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DDP steps/s with gloo and hivemind, and hivemind's recovery from a peer's "
        "death.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--backends", default="auto",
                        help="comma-separated subset of gloo,hivemind; 'auto': gloo, plus hivemind "
                        "when it is available")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    parser.add_argument("--ranks", default="2,4", help="comma-separated rank counts")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per job")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per job")
    parser.add_argument("--hivemind-layout", choices=["launch", "swarm"], default="launch",
                        help="hivemind jobs as one launch of N ranks (like gloo) or as N "
                        "independent launches of world_size 1")
    parser.add_argument("--no-death", action="store_true", help="skip the peer-death measurement")
    parser.add_argument("--death-peers", type=int, default=4,
                        help="independent launches in the peer-death measurement")
    parser.add_argument("--kill-at-step", type=int, default=20,
                        help="SIGKILL one peer once every peer has completed this many steps")
    parser.add_argument("--steps-after-kill", type=int, default=20,
                        help="steps the survivors run after the kill step")
    parser.add_argument("--matchmaking-time", type=float, default=None,
                        help="HIVEMIND_MATCHMAKING_TIME for hivemind peers (default: the "
                        "backend's)")
    parser.add_argument("--op-timeout", type=float, default=30.0,
                        help="c10d timeout of every collective, seconds")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline of each job, seconds")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< 30 s on an idle machine): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    # Internal: the parent re-runs this script with these to start one rank.
    parser.add_argument("--worker", choices=["throughput", "death"], help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, default="mlp", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--init-method", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # quick values replace the defaults, not what was given on the command line
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.death_peers < 2 or args.kill_at_step < 1 or args.steps_after_kill < 1:
        parser.error("need --death-peers >= 2, --kill-at-step >= 1, --steps-after-kill >= 1")
    return args


def parse_list(text: str, allowed=None, kind=str) -> list:
    items = [kind(item) for item in text.split(",") if item.strip()]
    if allowed is not None:
        unknown = [item for item in items if item not in allowed]
        if unknown:
            sys.exit(f"unknown value(s) {unknown}; choose from {list(allowed)}")
    return items


# -------------------------------------------------------------------------------------------------
# One rank (a child process).

def build_model(name: str):
    from torch import nn

    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    return nn.Sequential(  # cnn, on 1x8x8 digit-sized images
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def run_worker(args) -> int:
    import datetime

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    if args.backend == "hivemind":
        import hivemind_backend  # noqa: F401  (registers the "hivemind" backend)

    torch.set_num_threads(1)  # see the module docstring: ranks share 2 cores
    dist.init_process_group(args.backend, init_method=args.init_method, rank=args.rank,
                            world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=args.op_timeout))
    torch.manual_seed(0)  # identical initial weights on every rank, whatever the launch layout
    ddp = DistributedDataParallel(build_model(args.model))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    # A few fixed synthetic batches, made before timing: the timed loop is forward, backward (with
    # DDP's all-reduce) and the optimizer step only.
    generator = torch.Generator().manual_seed(1 + args.rank)
    shape = (BATCH_SIZE, 64) if args.model == "mlp" else (BATCH_SIZE, 1, 8, 8)
    batches = [(torch.rand(shape, generator=generator),
                torch.randint(0, 10, (BATCH_SIZE,), generator=generator)) for _ in range(8)]

    def train_step(step: int) -> None:
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        loss_fn(ddp(x), y).backward()
        optimizer.step()

    if args.worker == "throughput":
        for step in range(args.warmup):
            train_step(step)
        started = time.perf_counter()
        for step in range(args.steps):
            train_step(step)
        elapsed = time.perf_counter() - started
        print(json.dumps({"rank": args.rank, "steps_per_s": args.steps / elapsed}), flush=True)
    else:
        # Death measurement: the wall clock (shared by all processes of the machine) of every
        # completed step, so the parent can line the steps up against the moment of its kill.
        for step in range(1, args.kill_at_step + args.steps_after_kill + 1):
            train_step(step)
            print(f"STEP {step} {time.time():.6f}", flush=True)

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
# The parent: jobs of worker processes.

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job:
    """Worker processes started together; their output lines come back as (index, line) through
    one queue, (index, None) at the end of a process's output."""

    def __init__(self, commands: list, env: dict):
        self.lines: queue.Queue = queue.Queue()
        self.output = [[] for _ in commands]  # kept to explain a failure
        self.processes = []
        for index, command in enumerate(commands):
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, bufsize=1)
            self.processes.append(process)
            threading.Thread(target=self._pump, args=(index, process), daemon=True).start()

    def _pump(self, index: int, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.put((index, line.rstrip("\n")))
        self.lines.put((index, None))

    def run(self, timeout: float, on_line=None, expect_killed=()) -> str:
        """Waits for every process to exit, calling on_line(index, line) for each line.
        Returns "" or what went wrong (timeout, a non-zero exit not in expect_killed)."""
        deadline = time.monotonic() + timeout
        running = set(range(len(self.processes)))
        try:
            while running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return (f"timed out after {timeout:.0f} s; still running: ranks "
                            f"{sorted(running)}")
                try:
                    index, line = self.lines.get(timeout=remaining)
                except queue.Empty:
                    continue
                if line is None:
                    running.discard(index)
                    try:
                        code = self.processes[index].wait(timeout=max(0.1, remaining))
                    except subprocess.TimeoutExpired:
                        return f"process {index} closed its output but did not exit"
                    if code != 0 and index not in expect_killed:
                        tail = "\n    ".join(self.output[index][-15:])
                        return (f"process {index} exited with code {code}; its last lines:\n"
                                f"    {tail}")
                    continue
                self.output[index].append(line)
                if on_line is not None:
                    on_line(index, line)
            return ""
        finally:
            self.kill_all()

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


class Bench:
    def __init__(self, args):
        self.args = args
        self.script = os.path.abspath(__file__)
        # One torch thread per process, including whatever OpenMP would start.
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.dht = None  # the hivemind bootstrap node, started on first use

    def hivemind_env(self, launches: int) -> dict:
        """Environment of hivemind peers: loopback only; with several launches, a swarm that meets
        at this process's bootstrap DHT node under a fresh run id and starts averaging once all
        `launches` have joined. A single launch needs no DHT of ours: it starts its own swarm
        through its c10d store, exactly as a Gloo job would be started."""
        env = dict(self.env, HIVEMIND_HOST_MADDRS=LOOPBACK)
        if self.args.matchmaking_time is not None:
            env["HIVEMIND_MATCHMAKING_TIME"] = str(self.args.matchmaking_time)
        if launches > 1:
            if self.dht is None:
                import hivemind_backend

                self.dht = hivemind_backend.DHT(host_maddrs=[LOOPBACK], start=True)
            env.update(HIVEMIND_INITIAL_PEERS=",".join(self.dht.get_visible_maddrs()),
                       # Fresh per job: a job never averages with an earlier job's leftovers.
                       HIVEMIND_RUN_ID=f"bench-ddp-{uuid.uuid4().hex[:8]}",
                       HIVEMIND_MIN_GROUP_SIZE=str(launches))
        return env

    def commands(self, mode: str, backend: str, model: str, ranks: int, independent: bool):
        a = self.args
        common = [sys.executable, self.script, "--worker", mode, "--backend", backend,
                  "--model", model, "--warmup", str(a.warmup), "--steps", str(a.steps),
                  "--kill-at-step", str(a.kill_at_step), "--steps-after-kill",
                  str(a.steps_after_kill), "--op-timeout", str(a.op_timeout)]
        shared_port = free_port()
        for rank in range(ranks):
            if independent:  # its own launch: rank 0 of world_size 1, its own store
                yield common + ["--init-method", f"tcp://127.0.0.1:{free_port()}", "--rank", "0",
                                "--world-size", "1"]
            else:
                yield common + ["--init-method", f"tcp://127.0.0.1:{shared_port}", "--rank",
                                str(rank), "--world-size", str(ranks)]

    def throughput(self, backend: str, model: str, ranks: int):
        """Steps/s of the slowest rank, or (None, why it failed)."""
        independent = backend == "hivemind" and self.args.hivemind_layout == "swarm"
        env = self.env
        if backend == "hivemind":
            env = self.hivemind_env(launches=ranks if independent else 1)
        job = Job(list(self.commands("throughput", backend, model, ranks, independent)), env)
        speeds = []

        def on_line(index, line):
            if line.startswith("{"):
                speeds.append(json.loads(line)["steps_per_s"])

        problem = job.run(self.args.timeout, on_line)
        if not problem and len(speeds) != ranks:
            problem = f"{len(speeds)} of {ranks} ranks reported a speed"
        return (None, problem) if problem else (min(speeds), "")

    def death(self):
        """(report line, "") or (None, why it failed)."""
        a = self.args
        peers = a.death_peers
        victim = peers - 1
        job = Job(list(self.commands("death", "hivemind", "mlp", peers, independent=True)),
                  self.hivemind_env(launches=peers))
        steps = [[] for _ in range(peers)]  # per peer: wall-clock time of each completed step
        killed_at = []

        def on_line(index, line):
            if not line.startswith("STEP "):
                return
            _, step, stamp = line.split()
            steps[index].append(float(stamp))
            # The cue is progress every peer reported, not a timer: the kill lands mid-training.
            if not killed_at and all(len(s) >= a.kill_at_step for s in steps):
                killed_at.append(time.time())
                job.processes[victim].send_signal(signal.SIGKILL)

        problem = job.run(a.timeout, on_line, expect_killed={victim})
        if problem:
            return None, problem
        if not killed_at:
            return None, "the peers never all reached the kill step"
        kill = killed_at[0]
        gaps = []
        for peer in range(peers - 1):
            after = [stamp for stamp in steps[peer] if stamp > kill]
            if not after:
                return None, f"survivor {peer} completed no step after the kill"
            gaps.append(min(after) - kill)
        before = [later - earlier for s in steps for earlier, later in zip(s, s[1:])
                  if later <= kill]
        line = (f"hivemind peer death: {peers} independent launches, SIGKILL of peer {victim} "
                f"after every peer completed {a.kill_at_step} steps. Median step before the kill: "
                f"{1e3 * statistics.median(before):.1f} ms. Kill -> next step completed by every "
                f"survivor: {1e3 * max(gaps):.0f} ms (per survivor: "
                + ", ".join(f"{1e3 * g:.0f}" for g in gaps) + " ms)")
        return line, ""

    def close(self):
        if self.dht is not None:
            self.dht.shutdown()


def hivemind_unavailable() -> str:
    """"" when `import hivemind_backend` registers the "hivemind" c10d backend, else why not."""
    try:
        import hivemind_backend  # noqa: F401
    except ImportError as error:
        return f"cannot import hivemind_backend: {error}"
    import torch.distributed as dist

    if "hivemind" not in dist.Backend.backend_list:
        return "hivemind_backend registers no 'hivemind' c10d backend"
    return ""


def print_table(rows: list, backends: list) -> None:
    header = ["model", "ranks"] + [f"{b} steps/s" for b in backends]
    if "hivemind" in backends and "gloo" in backends:
        header.append("hivemind/gloo")
    table = [header]
    for model, ranks, speeds in rows:
        cells = [model, str(ranks)] + [f"{speeds[b]:.1f}" if speeds[b] else "failed"
                                       for b in backends]
        if len(header) > len(cells):
            ratio = (speeds["hivemind"] / speeds["gloo"]
                     if speeds["hivemind"] and speeds["gloo"] else None)
            cells.append(f"{ratio:.2f}" if ratio else "-")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)

    models = parse_list(args.models, MODELS)
    rank_counts = parse_list(args.ranks, kind=int)
    if any(n < 1 for n in rank_counts):
        sys.exit("--ranks must be positive")
    if args.backends == "auto":
        backends = ["gloo"] + ([] if hivemind_unavailable() else ["hivemind"])
    else:
        backends = parse_list(args.backends, ("gloo", "hivemind"))
        problem = "hivemind" in backends and hivemind_unavailable()
        if problem:
            print(f"hivemind was asked for but is not available: {problem}", flush=True)
            return 3
    print(f"DDP on CPU, 1 torch thread per rank, batch {BATCH_SIZE} per rank, {args.warmup} "
          f"warm-up + {args.steps} timed steps; backends: {', '.join(backends)}"
          + (f" (hivemind layout: {args.hivemind_layout})" if "hivemind" in backends else ""),
          flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # leave through the finally below
    bench = Bench(args)
    failures = []
    try:
        rows = []
        for model in models:
            for ranks in rank_counts:
                speeds = {}
                for backend in backends:
                    speeds[backend], problem = bench.throughput(backend, model, ranks)
                    if problem:
                        failures.append(f"{backend} {model} x{ranks}: {problem}")
                rows.append((model, ranks, speeds))
        print_table(rows, backends)
        if "hivemind" in backends and not args.no_death:
            line, problem = bench.death()
            if problem:
                failures.append(f"peer-death measurement: {problem}")
            else:
                print(line, flush=True)
    finally:
        bench.close()
    for failure in failures:
        print(f"FAILED: {failure}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
