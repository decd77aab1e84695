#!/usr/bin/env python3
"""DHT benchmark: our DHT (benchmark_dht) against hivemind's, on the same workload in one run.

The workload is hivemind's benchmarks/benchmark_dht.py with its defaults: 16 peers (each
bootstrapping from up to 4 earlier ones), 10 workers x 16 rounds, 8 peers storing one subkey each
under a fresh key per round, then 8 peers getting it with latest=True; 10% of the peers shut down
during the run; records live 300 s; every RPC has a 5 s deadline.

    python3 benchmarks/benchmark_dht.py [--binary build/bin/benchmark_dht]
        [--hivemind-python /tmp/hivemind-venv/bin/python] [--quick] [workload flags]

Runs `benchmark_dht --json`; with --hivemind-python (the python of a side virtual environment that
has `pip install hivemind`), then runs benchmarks/benchmark_dht_hivemind.py with it, and prints one
table with both and the latency ratios hivemind / ours (above 1: ours is faster). hivemind is
never a dependency of this project.

Exit codes: 0 done; 1 our benchmark crashed or printed no result; 3 the hivemind run was asked for
but could not be done (the reason is printed).
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HIVEMIND_SCRIPT = os.path.join(HERE, "benchmark_dht_hivemind.py")
ROWS = ("peer_start", "store", "get", "store_phase", "get_phase")
# Workload flags passed on to both benchmarks, with their defaults (hivemind's benchmark_dht.py).
WORKLOAD = {
    "num_peers": 16,
    "initial_peers": 4,
    "rounds": 16,
    "num_threads": 10,
    "num_store_peers": 8,
    "num_get_peers": 8,
    "failure_rate": 0.1,
    "expiration": 300.0,
    "wait_timeout": 5.0,
    "latest": True,
    "seed": 30,
}
QUICK = {"rounds": 2, "num_threads": 2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--binary", default="build/bin/benchmark_dht",
                        help="our benchmark binary (default: build/bin/benchmark_dht)")
    parser.add_argument("--hivemind-python", metavar="PATH",
                        help="python of a side virtual environment with hivemind installed")
    parser.add_argument("--timeout", type=float, default=1200,
                        help="seconds each benchmark may run (default 1200)")
    parser.add_argument("--json-out", metavar="FILE", help="also write both results as JSON")
    parser.add_argument("--quick", action="store_true", help="2 workers x 2 rounds (smoke run)")
    for name, default in WORKLOAD.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"),
                                default=None, help=f"(default {default})")
        else:
            parser.add_argument(flag, type=type(default), default=None,
                                help=f"(default {default})")
    args = parser.parse_args(argv)
    workload = dict(WORKLOAD)
    if args.quick:
        workload.update(QUICK)
    for name in WORKLOAD:
        if getattr(args, name) is not None:
            workload[name] = getattr(args, name)
    return args, workload


def workload_flags(workload):
    flags = []
    for name, value in workload.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        flags.append(f"--{name.replace('_', '-')}={text}")
    return flags


def run_json(command, timeout, what):
    """Runs a benchmark printing one JSON object; returns (result or None, reason)."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        return None, f"{what}: cannot run {command[0]}: {exc}"
    except subprocess.TimeoutExpired:
        return None, f"{what}: did not finish within {timeout:.0f} s"
    stdout = proc.stdout.strip()
    result = None
    for text in (stdout, stdout.splitlines()[-1] if stdout else ""):
        try:
            result = json.loads(text)
            break
        except json.JSONDecodeError:
            continue
    if result is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return None, f"{what}: exit code {proc.returncode}, no JSON result; last output:\n{tail}"
    if proc.returncode != 0:
        return result, f"{what}: exit code {proc.returncode} (hung={result.get('hung')})"
    return result, ""


def fmt_row(label, s):
    rate = 100.0 * s["success_rate"]
    return (f"  {label:<18} {s['count']:>6} {rate:>7.1f}% {s['mean_ms']:>10.2f} "
            f"{s['p50_ms']:>10.2f} {s['p99_ms']:>10.2f} {s['max_ms']:>10.2f} {s['slow']:>5}")


def ratio(theirs, ours):
    if ours <= 0:
        return "   n/a"
    value = theirs / ours
    return f"{value:>9.2f}x" if value < 1 else f"{value:>9.1f}x"


def print_table(workload, ours, theirs):
    print("DHT benchmark: store/get latency and success, same workload and machine")
    print(f"  {workload['num_peers']} peers on 127.0.0.1 (each bootstraps from up to "
          f"{workload['initial_peers']}), {workload['num_threads']} workers x "
          f"{workload['rounds']} rounds, {workload['num_store_peers']} storing + "
          f"{workload['num_get_peers']} getting peers per round,")
    print(f"  failure rate {workload['failure_rate']} "
          f"(killed: ours {ours['peers_killed']}"
          + (f", hivemind {theirs['peers_killed']}" if theirs else "")
          + f" of {workload['num_peers']}), expiration {workload['expiration']:g} s, "
          f"latest={workload['latest']}, RPC timeout {workload['wait_timeout']:g} s, "
          f"seed {workload['seed']}")
    print()
    print(f"  {'operation / impl':<18} {'count':>6} {'success':>8} {'mean ms':>10} "
          f"{'p50 ms':>10} {'p99 ms':>10} {'max ms':>10} {'slow':>5}")
    for name in ROWS:
        print(name)
        a = ours["operations"][name]
        print(fmt_row("ours", a))
        if theirs:
            b = theirs["operations"][name]
            print(fmt_row(theirs["implementation"][:18], b))
            ratios = " ".join(f"{ratio(b[k], a[k]):>10}"
                              for k in ("mean_ms", "p50_ms", "p99_ms", "max_ms"))
            print(f"  {'hivemind / ours':<18} {'':>6} {'':>8} {ratios}")
    print()
    print("store/get: one operation, issue to completion; *_phase: one round's concurrent "
          "operations (wall time);")
    print("peer_start: start + bootstrap of one peer; slow: operations that took >= 0.9 x the "
          "RPC timeout.")
    for label, result in (("ours", ours), ("hivemind", theirs)):
        if not result:
            continue
        print(f"{label}: workload {result['total_seconds']:.2f} s", end="")
        if result.get("requests_per_get") is not None:
            print(f", {result['requests_per_get']:.2f} find requests per successful get", end="")
        print()
        for name in ROWS:
            for reason, count in result["operations"][name]["errors"].items():
                print(f"  {name} failed {count}x: {reason}")
    if theirs:
        print()
        print("target: 100% success and >= 10x lower latency than hivemind")
        for name in ("store", "get"):
            a, b = ours["operations"][name], theirs["operations"][name]
            checks = []
            checks.append(f"success {100 * a['success_rate']:.1f}% "
                          f"({'met' if a['success_rate'] == 1.0 else 'MISSED'})")
            for stat in ("mean_ms", "p50_ms", "p99_ms"):
                r = b[stat] / a[stat] if a[stat] > 0 else float("inf")
                checks.append(f"{stat[:-3]} {r:.1f}x ({'met' if r >= 10 else 'MISSED'})")
            print(f"  {name:<6} " + ", ".join(checks))


def main(argv=None):
    args, workload = parse_args(argv)
    flags = workload_flags(workload)

    ours, problem = run_json([args.binary, "--json"] + flags, args.timeout, "benchmark_dht")
    if ours is None:
        print(problem, file=sys.stderr)
        if not os.path.exists(args.binary):
            print("build it first: cmake --build build --target benchmark_dht, or pass --binary",
                  file=sys.stderr)
        return 1
    exit_code = 1 if problem else 0
    if problem:
        print(problem, file=sys.stderr)

    theirs, hivemind_problem = None, ""
    if args.hivemind_python:
        theirs, hivemind_problem = run_json(
            [args.hivemind_python, HIVEMIND_SCRIPT, "--json"] + flags, args.timeout, "hivemind run")

    print_table(workload, ours, theirs)
    if not args.hivemind_python:
        print("\n(no hivemind comparison: pass --hivemind-python PATH, the python of a side venv "
              "with `pip install hivemind`)")
    elif hivemind_problem:
        print(f"\nhivemind comparison: {hivemind_problem}")
        if exit_code == 0:
            exit_code = 3

    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump({"workload": workload, "ours": ours, "hivemind": theirs}, out, indent=1)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
