#!/usr/bin/env bash
# Load balancing on shaped links (docs/benchmarks.md, "Load balancing"). Each peer runs in a
# network namespace of its own whose link to a shared bridge is capped, upload and download, at
# its rate in Mbit/s (default DeDLOC's case: two fast peers, two slow ones). benchmark_averaging
# then runs one group of all the peers twice on the same links: first declaring equal bandwidths
# (equal shares, what a swarm that declares nothing gets), then declaring the real rates (shares
# balanced by them). The model's prediction for both is printed after the measurements.
#
#   sudo benchmarks/benchmark_load_balance.sh [RATES_MBIT=100,100,50,50] [SIZE=8M] [ROUNDS=3]
#
# Needs root (ip netns, tc) and a built build/bin/benchmark_averaging (make build). Everything it
# creates (namespaces hmlb*, bridge hmlb-br) is removed on exit.
set -euo pipefail

rates_csv=${1:-100,100,50,50}
size=${2:-8M}
rounds=${3:-3}
binary=${BINARY:-build/bin/benchmark_averaging}
IFS=, read -ra rates <<< "$rates_csv"
n=${#rates[@]}

if [[ $EUID -ne 0 ]]; then
  echo "needs root: network namespaces and tc" >&2
  exit 2
fi
if [[ ! -x $binary ]]; then
  echo "no $binary: run make build first" >&2
  exit 2
fi
if (( n < 2 || n > 16 )); then
  echo "give 2 to 16 rates, e.g. 100,100,50,50" >&2
  exit 2
fi

cleanup() {
  for ((i = 0; i < n; i++)); do ip netns del "hmlb$i" 2> /dev/null || true; done
  ip link del hmlb-br 2> /dev/null || true
}
trap cleanup EXIT
cleanup

ip link add hmlb-br type bridge
ip link set hmlb-br up
netns=""
for ((i = 0; i < n; i++)); do
  ns="hmlb$i"
  ip netns add "$ns"
  ip link add "$ns-h" type veth peer name "$ns-p"
  ip link set "$ns-p" netns "$ns"
  ip link set "$ns-h" master hmlb-br
  ip link set "$ns-h" up
  ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev "$ns-p"
  ip -n "$ns" link set "$ns-p" up
  ip -n "$ns" link set lo up
  # Upload leaves through the peer's end of the pair, download through the bridge's end.
  ip netns exec "$ns" tc qdisc add dev "$ns-p" root tbf rate "${rates[i]}mbit" burst 64kb latency 200ms
  tc qdisc add dev "$ns-h" root tbf rate "${rates[i]}mbit" burst 64kb latency 200ms
  netns+="${netns:+,}$ns@10.77.0.$((i + 1))"
done

run() {
  "$binary" --sizes="$size" --peers="$n" --rounds="$rounds" --warmup=1 --no-tcp-reference \
    --timeout=600 --netns="$netns" --bandwidths="$1" | grep -E "^ +[0-9]"
}
equal=$(printf '1%.0s,' $(seq "$n"))
echo "links (Mbit/s, each direction): $rates_csv; vector $size; $rounds timed rounds each"
echo "         S   n  median ms     min ms   bus GB/s   TCP GB/s   bound ms of bound  RSS/peer"
echo "equal shares (declared bandwidths ${equal%,}):"
run "${equal%,}"
echo "balanced shares (declared bandwidths $rates_csv):"
run "$rates_csv"

python3 - "$rates_csv" "$size" << 'EOF'
import sys
rates = [float(r) for r in sys.argv[1].split(",")]
size = sys.argv[2]
units = {"K": 2**10, "M": 2**20, "G": 2**30}
megabits = float(size[:-1]) * units[size[-1]] * 8 / 1e6 if size[-1] in units else float(size) * 8 / 1e6
n = len(rates)
# Per direction a normal member moves (1 + (n - 2) w) vectors when it reduces a fraction w.
equal = max((1 + (n - 2) / n) / r for r in rates) * megabits
balanced = max(1 / min(rates), 2 * (n - 1) / sum(rates)) * megabits
print(f"model: equal shares {equal * 1000:.0f} ms, balanced {balanced * 1000:.0f} ms "
      f"({equal / balanced:.2f}x); protocol overheads not included")
EOF
