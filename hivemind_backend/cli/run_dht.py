"""hivemind-dht: runs a standalone DHT peer, e.g. the bootstrap node of a swarm (docs/dht.md).

Prints the addresses others pass as --initial_peers, then a status line every --refresh_period
seconds, until SIGINT or SIGTERM, which shut it down cleanly (exit code 0).
Also runnable as `python3 -m hivemind_backend.cli.run_dht`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import List, Optional


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hivemind-dht",
        description="Run a hivemind_backend DHT peer (e.g. the bootstrap node of a swarm).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--initial_peers", nargs="*", default=[],
        help="multiaddrs of running peers, each ending in /p2p/<peer id>; none starts a new swarm",
    )
    parser.add_argument(
        "--host_maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"],
        help="multiaddrs to listen on; port 0 picks a free port",
    )
    parser.add_argument(
        "--announce_maddrs", nargs="+", default=[],
        help="multiaddrs to advertise instead of the listen addresses (NAT, port forwarding)",
    )
    parser.add_argument(
        "--identity_path", default=None,
        help="key file: created (mode 0600) if missing, then reused, so the peer id stays the same "
        "across restarts",
    )
    parser.add_argument(
        "--refresh_period", type=float, default=30.0,
        help="seconds between status lines (routing-table size, records stored)",
    )
    parser.add_argument(
        "--wait_timeout", type=float, default=3.0, help="deadline of each DHT call, seconds",
    )
    parser.add_argument(
        "--no_encryption", action="store_true",
        help="plain TCP links (trusted clusters only; every peer of the swarm must agree)",
    )
    args = parser.parse_args(argv)
    if not args.refresh_period > 0:
        parser.error("--refresh_period must be positive")
    if not args.wait_timeout > 0:
        parser.error("--wait_timeout must be positive")
    return args


def status_line(stats: dict) -> str:
    line = (
        f"routing table: {stats['routing_table_size']} peers, records stored: "
        f"{stats['stored_keys']} keys (+{stats['cached_keys']} cached)"
    )
    if stats["bootstrap_error"]:
        line += f"; not joined yet, retrying: {stats['bootstrap_error']}"
    return line


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    # Installed before the (slow) torch import and the bootstrap, so a signal arriving while the
    # node starts still ends the process cleanly.
    stop = threading.Event()

    def request_stop(signum, _frame):
        log(f"received {signal.Signals(signum).name}, shutting down")
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    from hivemind_backend import DHT  # imports torch: a second or so

    try:
        dht = DHT(
            initial_peers=args.initial_peers,
            host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs,
            identity_path=args.identity_path,
            encryption=not args.no_encryption,
            wait_timeout=args.wait_timeout,
            # A bootstrap node outlives its peers: keep running and retry rather than exit.
            ensure_bootstrap_success=False,
        )
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"hivemind-dht: error: {error}", file=sys.stderr, flush=True)
        return 2

    try:
        log(f"Running a DHT peer, peer id {dht.peer_id}")
        log("To connect other peers to this one, pass:")
        print("--initial_peers " + " ".join(dht.get_visible_maddrs()), flush=True)
        log(status_line(dht.get_stats()))
        while not stop.wait(timeout=args.refresh_period):
            log(status_line(dht.get_stats()))
    finally:
        dht.shutdown()
    log("DHT peer shut down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
