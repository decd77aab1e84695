#!/usr/bin/env python3
"""The workload of benchmarks/benchmark_dht.cpp on hivemind's own DHT, for comparison.

Run it with a Python that has hivemind installed (a side virtual environment: hivemind is never a
dependency of this project); benchmarks/benchmark_dht.py does that when given --hivemind-python.
It uses hivemind's public API only (hivemind.DHT: get_visible_maddrs, store, get, shutdown) and
prints the same JSON fields as `benchmark_dht --json`:

  - peers start one after another, each a hivemind.DHT on 127.0.0.1 bootstrapping from up to
    --initial-peers random earlier peers (peer_start: time until DHT(...) returned);
  - int(failure_rate * num_peers) random peers are set aside and shut down at random store-phase
    ends; the others do the work;
  - --num-threads concurrent workers (asyncio tasks) each run --rounds rounds: a fresh random key,
    --num-store-peers random peers each store one random subkey/value under it concurrently, then
    --num-get-peers random peers get it (latest=True by default) concurrently. A get succeeds when
    it returns exactly the subkeys whose store succeeded, each with its value.

Latency of one operation runs from issue until its awaiting coroutine resumes; a phase is the wall
time of one round's concurrent operations. Percentiles are nearest-rank, as in the C++ benchmark.

Exit codes: 0 done (whatever the success rates), 1 the swarm could not be built or an operation
hung, 2 bad flags, 3 hivemind cannot be imported by this Python.
"""

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time

OPERATIONS = ("peer_start", "store", "get", "store_phase", "get_phase")
HANG = "no result (hang)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-peers", type=int, default=16)
    parser.add_argument("--initial-peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per worker (16)")
    parser.add_argument("--num-threads", type=int, default=None, help="concurrent workers (10)")
    parser.add_argument("--num-store-peers", type=int, default=8)
    parser.add_argument("--num-get-peers", type=int, default=8)
    parser.add_argument("--failure-rate", type=float, default=0.1)
    parser.add_argument("--expiration", type=float, default=300.0)
    parser.add_argument("--wait-timeout", type=float, default=5.0, help="per-RPC timeout, seconds")
    parser.add_argument("--latest", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--seed", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="2 workers x 2 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 16
    if args.num_threads is None:
        args.num_threads = 2 if args.quick else 10
    num_killed = int(args.failure_rate * args.num_peers)
    if args.num_peers < 2 or args.initial_peers < 1 or args.rounds < 1 or args.num_threads < 1:
        parser.error("--num-peers >= 2, --initial-peers, --rounds, --num-threads >= 1")
    if args.num_store_peers < 1 or args.num_get_peers < 1:
        parser.error("--num-store-peers and --num-get-peers must be at least 1")
    if args.failure_rate < 0 or num_killed >= args.num_peers:
        parser.error("--failure-rate must be in [0, 1) and leave at least one peer alive")
    if args.expiration <= 0 or args.wait_timeout <= 0:
        parser.error("--expiration and --wait-timeout must be positive")
    return args


class OpStats:
    def __init__(self):
        self.latencies_ms = []
        self.ok = 0
        self.errors = {}

    def add(self, latency_ms, success, error=""):
        self.latencies_ms.append(latency_ms)
        if success:
            self.ok += 1
        else:
            reason = error or "unknown"
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def summary(self, slow_ms):
        values = sorted(self.latencies_ms)
        count = len(values)

        def percentile(q):
            if not values:
                return 0.0
            return values[min(max(math.ceil(q * count), 1), count) - 1]

        return {
            "count": count,
            "ok": self.ok,
            "success_rate": self.ok / count if count else 0.0,
            "mean_ms": sum(values) / count if count else 0.0,
            "p50_ms": percentile(0.50),
            "p99_ms": percentile(0.99),
            "max_ms": values[-1] if values else 0.0,
            "slow": sum(1 for v in values if v >= slow_ms),
            "errors": dict(self.errors),
        }


class PeerKiller:
    """Shuts the set-aside peers down, one at each scheduled tick (a finished store phase)."""

    def __init__(self, victims, total_ticks, rng):
        victims = list(victims)
        rng.shuffle(victims)
        self.victims = victims
        self.schedule = sorted(rng.sample(range(total_ticks), min(len(victims), total_ticks)))
        self.tick = 0
        self.killed = 0
        self.lock = asyncio.Lock()

    async def on_tick(self):
        async with self.lock:
            if self.killed < len(self.schedule) and self.tick == self.schedule[self.killed]:
                victim = self.victims[self.killed]
                # DHT.shutdown() blocks until the peer's process exits: keep the event loop (and
                # so the other workers' latency measurements) running meanwhile.
                await asyncio.get_running_loop().run_in_executor(None, victim.shutdown)
                self.killed += 1
            self.tick += 1


def random_hex(rng):
    return "%032x" % rng.getrandbits(128)


async def timed(future, start):
    """Awaits one hivemind future: (result, error or "", latency in ms)."""
    try:
        result = await future
        error = ""
    except Exception as exc:  # a failed operation is a result to count, not a crash
        result, error = None, f"{type(exc).__name__}: {exc}"
    return result, error, (time.perf_counter() - start) * 1000


async def run_worker(args, peers, killer, rng, stats, get_dht_time, phase_limit):
    for _ in range(args.rounds):
        key = random_hex(rng)
        storers = rng.sample(peers, min(args.num_store_peers, len(peers)))
        subkeys = [random_hex(rng) for _ in storers]
        values = [random_hex(rng) for _ in storers]

        start = time.perf_counter()
        tasks = [
            asyncio.ensure_future(
                timed(
                    peer.store(
                        key,
                        value,
                        get_dht_time() + args.expiration,
                        subkey=subkey,
                        return_future=True,
                    ),
                    start,
                )
            )
            for peer, subkey, value in zip(storers, subkeys, values)
        ]
        done, pending = await asyncio.wait(tasks, timeout=phase_limit)
        phase_ms = (time.perf_counter() - start) * 1000
        stored = {}
        for task, subkey, value in zip(tasks, subkeys, values):
            if task not in done:
                task.cancel()
                stats["store"].add(phase_ms, False, HANG)
                continue
            result, error, latency = task.result()
            success = not error and bool(result)
            if success:
                stored[subkey] = value
            stats["store"].add(latency, success, error or ("" if success else "store refused"))
        stats["store_phase"].add(phase_ms, not pending, HANG if pending else "")
        if pending:
            return True
        await killer.on_tick()

        getters = rng.sample(peers, min(args.num_get_peers, len(peers)))
        start = time.perf_counter()
        tasks = [
            asyncio.ensure_future(
                timed(peer.get(key, latest=args.latest, return_future=True), start)
            )
            for peer in getters
        ]
        done, pending = await asyncio.wait(tasks, timeout=phase_limit)
        phase_ms = (time.perf_counter() - start) * 1000
        for task in tasks:
            if task not in done:
                task.cancel()
                stats["get"].add(phase_ms, False, HANG)
                continue
            result, error, latency = task.result()
            if not error:
                if result is None:
                    error = "key not found"
                elif not isinstance(result.value, dict) or len(result.value) != len(stored):
                    error = "wrong number of subkeys"
                elif any(
                    subkey not in result.value or result.value[subkey].value != value
                    for subkey, value in stored.items()
                ):
                    error = "wrong or missing subkey value"
            stats["get"].add(latency, not error, error)
        stats["get_phase"].add(phase_ms, not pending, HANG if pending else "")
        if pending:
            return True
    return False


async def run_workload(args, peers, rng, stats, get_dht_time):
    shuffled = rng.sample(peers, len(peers))
    num_killed = int(args.failure_rate * args.num_peers)
    victims, workers_peers = shuffled[:num_killed], shuffled[num_killed:]
    killer = PeerKiller(victims, args.num_threads * args.rounds, rng)
    phase_limit = 20 * args.wait_timeout + 30
    seeds = [rng.getrandbits(64) for _ in range(args.num_threads)]
    per_worker = [{name: OpStats() for name in OPERATIONS} for _ in seeds]
    hung = await asyncio.gather(
        *(
            run_worker(args, workers_peers, killer, random.Random(seed), worker_stats,
                       get_dht_time, phase_limit)
            for seed, worker_stats in zip(seeds, per_worker)
        )
    )
    for worker_stats in per_worker:
        for name in ("store", "get", "store_phase", "get_phase"):
            merged, part = stats[name], worker_stats[name]
            merged.latencies_ms += part.latencies_ms
            merged.ok += part.ok
            for reason, count in part.errors.items():
                merged.errors[reason] = merged.errors.get(reason, 0) + count
    return killer.killed, any(hung)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")  # read when hivemind is imported
    try:
        import hivemind
    except Exception as exc:
        print(
            f"benchmark_dht_hivemind: cannot import hivemind with {sys.executable}: "
            f"{type(exc).__name__}: {exc}\n"
            "  create a side environment: python3 -m venv /tmp/hivemind-venv "
            "--system-site-packages && /tmp/hivemind-venv/bin/pip install hivemind",
            file=sys.stderr,
        )
        return 3
    try:
        from hivemind.utils import get_dht_time
    except ImportError:
        get_dht_time = hivemind.get_dht_time

    rng = random.Random(args.seed)
    stats = {name: OpStats() for name in OPERATIONS}
    peers = []
    exit_code = 0
    killed, hung, total_seconds = 0, False, 0.0
    try:
        for index in range(args.num_peers):
            neighbors = rng.sample(peers, min(args.initial_peers, len(peers)))
            initial = [maddr for peer in neighbors for maddr in peer.get_visible_maddrs()]
            start = time.perf_counter()
            try:
                peer = hivemind.DHT(
                    initial_peers=initial,
                    start=True,
                    wait_timeout=args.wait_timeout,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                )
            except Exception as exc:
                print(f"benchmark_dht_hivemind: peer {index} did not start: {exc!r}",
                      file=sys.stderr)
                return 1
            stats["peer_start"].add((time.perf_counter() - start) * 1000, True)
            peers.append(peer)

        started = time.perf_counter()
        killed, hung = asyncio.run(run_workload(args, peers, rng, stats, get_dht_time))
        total_seconds = time.perf_counter() - started
        exit_code = 1 if hung else 0
    finally:
        for peer in peers:
            try:
                if peer.is_alive():
                    peer.shutdown()
            except Exception as exc:
                print(f"benchmark_dht_hivemind: shutdown: {exc!r}", file=sys.stderr)

    slow_ms = 0.9 * args.wait_timeout * 1000
    config = {
        key: getattr(args, key)
        for key in ("num_peers", "initial_peers", "rounds", "num_threads", "num_store_peers",
                    "num_get_peers", "failure_rate", "expiration", "wait_timeout", "latest", "seed")
    }
    report = {
        "implementation": f"hivemind {getattr(hivemind, '__version__', '?')}",
        "config": config,
        "peers_killed": killed,
        "total_seconds": total_seconds,
        "hung": hung,
        "requests_per_get": None,
        "operations": {name: stats[name].summary(slow_ms) for name in OPERATIONS},
    }
    print(json.dumps(report))
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
