#!/usr/bin/env bash
# Speed accuracy and loopback throughput (docs/BENCHMARKS.md, "Speed accuracy and
# loopback throughput"). Needs root (network namespaces, tc), iperf3 and python3.
#
#   scripts/bench-speed.sh [DURATION_SECONDS]     # default 10 (per direction)
#
# 1. Two namespaces joined by a veth pair, each side shaped with
#    `tbf rate 100mbit burst 64kb latency 20ms`. iperf3 both directions (-t D -O 2),
#    then `edgeprobe-agent probe speed --duration D+2` (2 s warm-up excluded) against
#    `serve-target` on the same link. Prints a table with the ratios.
# 2. Unshaped loopback: `probe speed` against `serve-target` on 127.0.0.1.
set -euo pipefail

D=${1:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/edgeprobe-target-probes}
cd "$(dirname "$0")/.."
cargo build --release -p edgeprobe-agent >&2
BIN=$CARGO_TARGET_DIR/release/edgeprobe-agent

A=epbench-a-$$ B=epbench-b-$$
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$A"; ip netns add "$B"
ip link add veth-a netns "$A" type veth peer name veth-b netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev veth-a
ip -n "$B" addr add 10.77.0.2/24 dev veth-b
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set veth-a up; ip -n "$B" link set veth-b up
tc -n "$A" qdisc add dev veth-a root tbf rate 100mbit burst 64kb latency 20ms
tc -n "$B" qdisc add dev veth-b root tbf rate 100mbit burst 64kb latency 20ms

ip netns exec "$B" iperf3 -s -B 10.77.0.2 >/dev/null 2>&1 & PIDS+=($!)
ip netns exec "$B" "$BIN" serve-target --listen 10.77.0.2:8080 2>/dev/null & PIDS+=($!)
sleep 1

iperf() { ip netns exec "$A" iperf3 -c 10.77.0.2 -t "$D" -O 2 -J "$@" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])'; }
IPERF_UP=$(iperf)
IPERF_DOWN=$(iperf -R)
SHAPED=$(ip netns exec "$A" "$BIN" probe speed http://10.77.0.2:8080 --duration "$((D + 2))s" --json)

"$BIN" serve-target --listen 127.0.0.1:18181 2>/dev/null & PIDS+=($!)
sleep 0.5
LOOPBACK=$("$BIN" probe speed http://127.0.0.1:18181 --duration "$((D + 2))s" --json)

python3 - "$IPERF_DOWN" "$IPERF_UP" "$SHAPED" "$LOOPBACK" <<'PY'
import json, sys
down, up = float(sys.argv[1]), float(sys.argv[2])
s, l = json.loads(sys.argv[3]), json.loads(sys.argv[4])
print("| 100 Mbit/s tbf veth | iperf3 | edgeprobe | ratio |")
print("|---|---|---|---|")
for name, ref, key in (("download", down, "download_bits_per_second"), ("upload", up, "upload_bits_per_second")):
    print(f"| {name} | {ref/1e6:.2f} Mbit/s | {s[key]/1e6:.2f} Mbit/s | {s[key]/ref:.4f} |")
ms = lambda k, v: f"{v[k]*1e3:.3f} ms"
print(f"\nshaped latency: idle {ms('idle_latency_seconds', s)}, jitter {ms('jitter_seconds', s)}, "
      f"loaded download {ms('download_loaded_latency_seconds', s)}, loaded upload {ms('upload_loaded_latency_seconds', s)}")
print("\n| unshaped loopback | edgeprobe |")
print("|---|---|")
print(f"| download | {l['download_bits_per_second']/1e9:.2f} Gbit/s |")
print(f"| upload | {l['upload_bits_per_second']/1e9:.2f} Gbit/s |")
PY
