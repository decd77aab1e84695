#!/usr/bin/env python3
"""Averaging benchmark: our butterfly all-reduce against torch's Gloo all_reduce in one run.

For every (S, n) of the grid, one round of averaging a float32 vector of S bytes over n peers on
127.0.0.1, each peer its own process:
  - ours: benchmark_averaging --json (AllReduceService, one net::Node per process, no encryption
    unless --encrypt);
  - Gloo: torch.distributed with backend="gloo", n processes (torch.multiprocessing, FileStore),
    dist.all_reduce(SUM) on the same sizes (the division by n is left out of Gloo's time, in its
    favour; ours includes it);
  - c10d: the same torch.distributed job with backend="hivemind" (what DDP users call: the op
    thread, the flat buffer, the persistent swarm group and the same all-reduce underneath).
Both: warm-up rounds, then timed rounds; a round starts after a barrier, and its time is the last
peer's end minus the first peer's start on the shared monotonic clock; the median is reported.
Both check every round's result against the known mean. Ours runs right before Gloo for each n.

    python3 benchmarks/benchmark_averaging.py [--full] [--sizes 4,16,64] [--peers 2,4]
        [--rounds 5] [--warmup 1] [--encrypt] [--no-c10d] [--binary build/bin/benchmark_averaging]
        [--hivemind-python /tmp/hivemind-venv/bin/python] [--json-out FILE]

With --hivemind-python (the python of a side virtual environment with `pip install hivemind`),
also runs hivemind's DecentralizedAverager on the workload of hivemind's
benchmarks/benchmark_averaging.py with its defaults (16 peers, target group size 4 with 2 Moshpit
group bits, 5 rounds, the tensors of hid_size 256 x 3 layers = 2,373,888 floats, Float16Compression,
min_matchmaking_time 5 s, request_timeout 1 s, step timeout 15 s, peers started 0.1 s apart), and
ours on the same vector size with 4 groups of 4 processes running at once. hivemind is never a
dependency of this project.

Exit codes: 0 done; 1 a benchmark failed or a result was wrong; 3 the hivemind run was asked for
but could not be done (the reason is printed).
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MIB = 1 << 20
DEFAULT_SIZES_MIB = (4, 16, 64)
DEFAULT_PEERS = (2, 4)
FULL_SIZES_MIB = (4, 16, 64, 256)
FULL_PEERS = (2, 4, 8)

# hivemind's benchmarks/benchmark_averaging.py defaults.
HIVEMIND_DEFAULTS = {
    "num_peers": 16,
    "target_group_size": 4,
    "num_rounds": 5,
    "hid_size": 256,
    "num_layers": 3,
    "min_matchmaking_time": 5.0,
    "round_timeout": 15.0,
    "request_timeout": 1.0,
    "spawn_dtime": 0.1,
}


def hivemind_tensor_shapes(hid, layers):
    """Shapes of the tensors one peer averages in hivemind's benchmark (per layer, repeated)."""
    per_layer = [(hid, 3 * hid), (3 * hid,), (3 * hid,), (hid, hid), (hid,), (hid,),
                 (hid, 4 * hid), (4 * hid,), (4 * hid,), (2, hid, hid, 2), (hid,), (hid,), (hid,)]
    return per_layer * layers


def hivemind_elements(hid, layers):
    return sum(math.prod(shape) for shape in hivemind_tensor_shapes(hid, layers))


def median(values):
    return statistics.median(values) if values else float("nan")


def bus_gbps(size_bytes, n, seconds):
    return 2.0 * (n - 1) / n * size_bytes / seconds / 1e9


# -------------------------------------------------------------------------------------------------
# Ours.

def run_ours(binary, extra_flags, timeout):
    """Runs benchmark_averaging --json; returns (result or None, problem text)."""
    command = [binary, "--json"] + extra_flags
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        return None, f"cannot run {binary}: {exc}"
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(command)} did not finish within {timeout:.0f} s"
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if result is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return None, (f"{' '.join(command)}: exit code {proc.returncode}, no JSON; "
                      f"last output:\n{tail}")
    if proc.returncode != 0 or not result.get("ok"):
        return result, f"{' '.join(command)}: exit code {proc.returncode}: {result.get('error')}"
    return result, ""


# -------------------------------------------------------------------------------------------------
# torch.distributed (Gloo, or ours as a c10d backend): one process per rank, spawned by
# torch.multiprocessing.

def torch_worker(rank, backend, n, sizes, warmup, rounds, store_path, timeout_s, encrypt, queue):
    import datetime

    import torch
    import torch.distributed as dist

    if backend == "hivemind":
        import hivemind_backend  # noqa: F401  (registers the backend)
        # Links as in the "ours" column (CURVE only with --encrypt; the backend's default is on).
        os.environ["HIVEMIND_ENCRYPTION"] = "1" if encrypt else "0"
        os.environ["HIVEMIND_COMPRESSION"] = "none"
    store = dist.FileStore(store_path, n)
    dist.init_process_group(backend, store=store, rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = {}
    error = ""
    try:
        for size in sizes:
            elements = size // 4
            # Same inputs as ours: rank + base + (i % 7) / 2, so the mean is exact in float32.
            pattern = (torch.arange(elements, dtype=torch.int64) % 7).to(torch.float32) * 0.5
            times = []
            for r in range(warmup + rounds):
                base = float((r + 1) % 64)
                tensor = pattern + (rank + base)
                dist.barrier()
                start = time.monotonic_ns()
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                end = time.monotonic_ns()
                dist.barrier()  # as ours: no rank checks its result while another still runs
                tensor.div_(n)
                expected = pattern + (base + 0.5 * (n - 1))
                if not torch.equal(tensor, expected):
                    bad = int((tensor != expected).nonzero()[0])
                    raise RuntimeError(f"{backend}: wrong mean at element {bad} of S={size}: "
                                       f"{float(tensor[bad])}, expected {float(expected[bad])}")
                del tensor, expected
                if r >= warmup:
                    times.append((start, end))
            results[size] = times
    except Exception as exc:  # reported to the parent, which fails the run
        error = f"rank {rank}: {exc}"
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((rank, results, rss_mib, error))
    dist.destroy_process_group()


def run_torch(backend, n, sizes, warmup, rounds, timeout, encrypt):
    """Returns ({size: [round seconds]}, max rss MiB per rank, problem text)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix=f"bench-{backend}-") as directory:
        store_path = os.path.join(directory, "store")
        procs = mp.start_processes(
            torch_worker,
            args=(backend, n, list(sizes), warmup, rounds, store_path, timeout, encrypt, queue),
            nprocs=n, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not procs.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    for process in procs.processes:
                        process.kill()
                    return None, 0, f"{backend} with n={n} did not finish within {timeout:.0f} s"
        except Exception as exc:  # a rank died
            return None, 0, f"{backend} with n={n}: {exc}"
    per_rank = []
    while not queue.empty():
        per_rank.append(queue.get())
    errors = [error for _, _, _, error in per_rank if error]
    if len(per_rank) != n or errors:
        return None, 0, f"{backend} with n={n}: " + ("; ".join(errors) or "a rank sent no result")
    seconds = {}
    for size in sizes:
        rounds_of = [results[size] for _, results, _, _ in per_rank]
        seconds[size] = [(max(r[i][1] for r in rounds_of) - min(r[i][0] for r in rounds_of)) / 1e9
                         for i in range(rounds)]
    return seconds, max(rss for _, _, rss, _ in per_rank), ""


# -------------------------------------------------------------------------------------------------
# hivemind (runs inside the side environment: this file with --hivemind-worker).

def hivemind_worker(params):
    import torch

    import hivemind
    from hivemind.averaging.control import AveragingStage
    from hivemind.compression import Float16Compression

    num_peers, group_size = params["num_peers"], params["target_group_size"]
    num_groups = 2 ** int(round(math.log2(num_peers / group_size)))
    nbits = int(round(math.log2(num_groups)))
    shapes = hivemind_tensor_shapes(params["hid_size"], params["num_layers"])
    started = time.monotonic()
    root = hivemind.DHT(start=True)
    initial_peers = root.get_visible_maddrs()
    lock = threading.Lock()
    steps, errors, to_shutdown = [], [], [root]

    # hivemind 1.1.12 installs signal handlers when a DHT starts, which only works in the main
    # thread: start the peers here, 0.1 s apart as hivemind's workload does, then step in threads.
    averagers = []
    for index in range(num_peers):
        try:
            dht = hivemind.DHT(initial_peers=initial_peers, start=True)
            to_shutdown.append(dht)
            bits = bin(index % num_groups)[2:].rjust(nbits, "0") if nbits else ""
            averager = hivemind.averaging.DecentralizedAverager(
                [torch.randn(*shape) for shape in shapes], dht, prefix="bench_tensor",
                initial_group_bits=bits, compression=Float16Compression(),
                target_group_size=group_size, min_matchmaking_time=params["min_matchmaking_time"],
                request_timeout=params["request_timeout"], start=True)
            to_shutdown.append(averager)
            averagers.append((index, averager))
        except Exception as exc:
            errors.append(f"peer {index} start: {type(exc).__name__}: {exc}")
        time.sleep(params["spawn_dtime"])
    startup_s = time.monotonic() - started

    def run_peer(index, averager):
        for step in range(params["num_rounds"]):
            begin = time.monotonic()
            allreduce_began = None
            ok = False
            try:
                control = averager.step(timeout=params["round_timeout"], wait=False)
                # The stage lives in shared memory; sample it to split matchmaking from all-reduce
                # (2 ms resolution), bounded by the step's own deadline plus a margin.
                limit = begin + params["round_timeout"] + 30
                while not control.done() and time.monotonic() < limit:
                    stage = control.stage
                    if stage == AveragingStage.RUNNING_ALLREDUCE and allreduce_began is None:
                        allreduce_began = time.monotonic()
                    elif stage == AveragingStage.LOOKING_FOR_GROUP:
                        allreduce_began = None  # a failed attempt went back to matchmaking
                    time.sleep(0.002)
                ok = control.result(timeout=max(0.0, limit - time.monotonic())) is not None
            except Exception as exc:
                with lock:
                    errors.append(f"peer {index} step {step}: {type(exc).__name__}: {exc}")
            end = time.monotonic()
            with lock:
                steps.append({"peer": index, "step": step, "ok": ok, "total_s": end - begin,
                              "allreduce_s": (end - allreduce_began) if ok and allreduce_began
                              else None})

    threads = [threading.Thread(target=run_peer, args=pair, daemon=True) for pair in averagers]
    for thread in threads:
        thread.start()
    workload_start = time.monotonic()
    for thread in threads:
        thread.join(timeout=params["num_rounds"] * (params["round_timeout"] + 60))
    workload_s = time.monotonic() - workload_start
    for process in reversed(to_shutdown):
        try:
            process.shutdown()
        except Exception:
            pass
    return {"implementation": f"hivemind {hivemind.__version__}", "params": params,
            "steps": steps, "errors": errors[:20], "workload_s": workload_s,
            "startup_s": startup_s,
            "total_s": time.monotonic() - started,
            "bytes": 4 * sum(math.prod(shape) for shape in shapes)}


def run_hivemind(python, timeout):
    command = [python, os.path.abspath(__file__), "--hivemind-worker"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        return None, f"cannot run {python}: {exc}"
    except subprocess.TimeoutExpired:
        return None, f"the hivemind run did not finish within {timeout:.0f} s"
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
        if not any(step["ok"] for step in result["steps"]):
            return result, "no hivemind step succeeded: " + "; ".join(result["errors"][:3])
        return result, ""
    except (json.JSONDecodeError, IndexError):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return None, f"the hivemind run failed (exit code {proc.returncode}); last output:\n{tail}"


# -------------------------------------------------------------------------------------------------
# Report.

def fmt_size(size):
    return f"{size // MIB} MiB" if size % MIB == 0 else f"{size / MIB:.2f} MiB"


def print_table(rows, encrypt):
    print("averaging benchmark: one all-reduce round (mean of a float32 vector), n peers = n "
          "processes on 127.0.0.1")
    print(f"ours: AllReduceService ({'CURVE' if encrypt else 'no encryption'}); c10d: torch "
          f"{rows[0]['torch'] if rows else ''} dist.all_reduce(SUM) with backend hivemind; gloo: "
          f"the same with backend gloo")
    print("time = median over timed rounds of (last peer done - first peer started); "
          "bus GB/s = 2(n-1)/n * S / time")
    print("x gloo = gloo time / that time (above 1: faster than Gloo); of bound = fraction of the "
          "loopback bound (see benchmark_averaging.cpp)")
    print()

    def ms(seconds):
        return f"{seconds * 1e3:9.1f}" if seconds else f"{'-':>9}"

    def versus(seconds, gloo_s):
        return f"{gloo_s / seconds:9.2f}x" if seconds and gloo_s else f"{'-':>10}"

    print(f"{'S':>9} {'n':>3} {'ours ms':>9} {'c10d ms':>9} {'gloo ms':>9} {'ours GB/s':>10} "
          f"{'ours x gloo':>11} {'c10d x gloo':>11} {'of bound':>9} {'RSS ours/gloo MiB':>18}")
    print("-" * 107)
    for row in rows:
        ours_s, gloo_s = row["ours_s"], row["gloo_s"]
        bound = f"{row['bound_fraction']:9.2f}" if row["bound_fraction"] else f"{'-':>9}"
        rss = f"{row['ours_rss']:.0f} / {row['gloo_rss']:.0f}"
        print(f"{fmt_size(row['size']):>9} {row['n']:>3} {ms(ours_s)} {ms(row['c10d_s'])} "
              f"{ms(gloo_s)} {bus_gbps(row['size'], row['n'], ours_s):10.2f} "
              f"{versus(ours_s, gloo_s):>11} {versus(row['c10d_s'], gloo_s):>11} {bound} "
              f"{rss:>18}")
    for name, key in (("ours", "ours_s"), ("c10d", "c10d_s")):
        measured = [row for row in rows if row["gloo_s"] and row[key]]
        met = [row for row in measured if row["gloo_s"] >= row[key]]
        if measured:
            print(f"\ntarget: at least Gloo's speed ({name}): met in {len(met)} of {len(measured)}"
                  f" rows" + ("" if len(met) == len(measured) else " (MISSED in the others)"),
                  end="")
    print()


def print_hivemind(theirs, ours_row, problem):
    print()
    if problem:
        print(f"hivemind comparison: {problem}")
        if not theirs:
            return
    params = theirs["params"]
    steps = theirs["steps"]
    good = [s for s in steps if s["ok"]]
    total = [s["total_s"] for s in good]
    allreduce = [s["allreduce_s"] for s in good if s["allreduce_s"] is not None]
    print(f"hivemind comparison: {params['num_peers']} peers, groups of "
          f"{params['target_group_size']}, {params['num_rounds']} rounds, "
          f"{fmt_size(theirs['bytes'])} float32 per peer "
          f"(hid_size {params['hid_size']} x {params['num_layers']} layers; hivemind sends "
          f"float16, ours float32)")
    print(f"  {theirs['implementation']}: {len(good)} of {len(steps)} steps succeeded, "
          f"workload {theirs['workload_s']:.1f} s after {theirs['startup_s']:.1f} s of startup")
    ours_s = ours_row["median_s"] if ours_row else None
    print(f"  {'':<34} {'median ms':>10} {'hivemind / ours':>16}")
    if ours_s:
        print(f"  {'ours: 4 groups x 4 processes':<34} {ours_s * 1e3:10.1f}")
    for label, values in (("hivemind step (matchmaking + AR)", total),
                          ("hivemind all-reduce phase only", allreduce)):
        if values:
            ratio = f"{median(values) / ours_s:15.1f}x" if ours_s else f"{'-':>16}"
            print(f"  {label:<34} {median(values) * 1e3:10.1f} {ratio}")
    if ours_s and total:
        ratio = median(total) / ours_s
        line = f"  target: >= 10x hivemind's round time: step {ratio:.0f}x " \
               f"({'met' if ratio >= 10 else 'MISSED'})"
        if allreduce:
            ratio_ar = median(allreduce) / ours_s
            line += f", all-reduce phase alone {ratio_ar:.1f}x " \
                    f"({'met' if ratio_ar >= 10 else 'MISSED'})"
        print(line)
    for error in theirs["errors"][:5]:
        print(f"  hivemind error: {error}")


def parse_list(text, kind):
    return tuple(kind(item) for item in text.split(",") if item)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default="build/bin/benchmark_averaging",
                        help="our benchmark binary (default: build/bin/benchmark_averaging)")
    parser.add_argument("--sizes", type=lambda s: parse_list(s, int), default=None,
                        help="vector sizes in MiB (default 4,16,64; --full: 4,16,64,256)")
    parser.add_argument("--peers", type=lambda s: parse_list(s, int), default=None,
                        help="group sizes (default 2,4; --full: 2,4,8)")
    parser.add_argument("--full", action="store_true", help="adds 256 MiB and n = 8")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument("--encrypt", action="store_true", help="CURVE on our links")
    parser.add_argument("--no-gloo", action="store_true", help="skip torch's Gloo")
    parser.add_argument("--no-c10d", action="store_true",
                        help="skip torch.distributed with backend hivemind")
    parser.add_argument("--hivemind-python", metavar="PATH",
                        help="python of a side virtual environment with hivemind installed")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds each benchmark run may take (default 600)")
    parser.add_argument("--json-out", metavar="FILE", help="also write every result as JSON")
    parser.add_argument("--hivemind-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.hivemind_worker:
        print(json.dumps(hivemind_worker(dict(HIVEMIND_DEFAULTS))))
        return 0

    sizes = [s * MIB for s in (args.sizes or (FULL_SIZES_MIB if args.full else DEFAULT_SIZES_MIB))]
    peers = args.peers or (FULL_PEERS if args.full else DEFAULT_PEERS)
    common = [f"--rounds={args.rounds}", f"--warmup={args.warmup}"]
    if args.encrypt:
        common.append("--encrypt")
    torch_version = ""
    if not (args.no_gloo and args.no_c10d):
        import torch
        torch_version = torch.__version__

    rows, raw, exit_code = [], {"ours": [], "gloo": {}, "c10d": {}}, 0
    for n in peers:
        print(f"  n = {n}: ours ...", file=sys.stderr, flush=True)
        ours, problem = run_ours(args.binary, common + [f"--peers={n}", "--sizes=" + ",".join(
            str(s) for s in sizes)], args.timeout)
        if problem:
            print(problem, file=sys.stderr)
            if not os.path.exists(args.binary):
                print("build it first: make build, or cmake --build build --target "
                      "benchmark_averaging; or pass --binary", file=sys.stderr)
            return 1
        raw["ours"].append(ours)
        measured = {}
        for backend, skip in (("hivemind", args.no_c10d), ("gloo", args.no_gloo)):
            if skip:
                continue
            print(f"  n = {n}: {backend} (torch.distributed) ...", file=sys.stderr, flush=True)
            times, rss, problem = run_torch(backend, n, sizes, args.warmup, args.rounds,
                                            args.timeout, args.encrypt)
            if problem:
                print(problem, file=sys.stderr)
                exit_code = 1
            measured[backend] = (times, rss)
            raw["c10d" if backend == "hivemind" else "gloo"][n] = times and {
                str(k): v for k, v in times.items()}
        gloo, gloo_rss = measured.get("gloo", (None, 0))
        c10d, _ = measured.get("hivemind", (None, 0))
        for row in ours["rows"]:
            size = row["size_bytes"]
            rows.append({"size": size, "n": n, "ours_s": row["median_s"],
                         "gloo_s": median(gloo[size]) if gloo else None,
                         "c10d_s": median(c10d[size]) if c10d else None,
                         "bound_fraction": row["bound_fraction"],
                         "ours_rss": row["max_rss_mib"], "gloo_rss": gloo_rss,
                         "torch": torch_version})
    rows.sort(key=lambda row: (row["n"], row["size"]))

    theirs, hivemind_problem, ours_hm = None, "", None
    if args.hivemind_python:
        elements = hivemind_elements(HIVEMIND_DEFAULTS["hid_size"], HIVEMIND_DEFAULTS["num_layers"])
        group = HIVEMIND_DEFAULTS["target_group_size"]
        print("  hivemind workload: ours (4 groups x 4) ...", file=sys.stderr, flush=True)
        ours_hm_run, problem = run_ours(
            args.binary, [f"--rounds={HIVEMIND_DEFAULTS['num_rounds']}", f"--warmup={args.warmup}",
                          f"--peers={group}",
                          f"--groups={HIVEMIND_DEFAULTS['num_peers'] // group}",
                          f"--sizes={4 * elements}"] + (["--encrypt"] if args.encrypt else []),
            args.timeout)
        if problem:
            print(problem, file=sys.stderr)
            exit_code = 1
        ours_hm = ours_hm_run["rows"][0] if ours_hm_run and ours_hm_run["rows"] else None
        print("  hivemind workload: hivemind ...", file=sys.stderr, flush=True)
        theirs, hivemind_problem = run_hivemind(args.hivemind_python, args.timeout)
        if hivemind_problem and exit_code == 0:
            exit_code = 3
        raw["hivemind"] = theirs
        raw["ours_hivemind_workload"] = ours_hm_run

    print_table(rows, args.encrypt)
    if args.hivemind_python:
        print_hivemind(theirs, ours_hm, hivemind_problem)
    else:
        print("\n(no hivemind comparison: pass --hivemind-python PATH, the python of a side venv "
              "with `pip install hivemind`)")
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump({"rows": rows, "raw": raw}, out, indent=1)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
