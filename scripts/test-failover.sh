#!/usr/bin/env bash
# The failover test (issue 16, gap 5; issue 28, case 1): a two-node Patroni cluster of
# PostgreSQL 15 with one etcd, a collector given both nodes in the multi-host URL that
# docs/SCALING.md recommends (target_session_attrs=read-write, the collector's liveness
# defaults), two agents landing tcp results every 50 ms. The primary (node1) runs in a
# network namespace behind a veth pair, as a database machine behind a router; node2 and
# everything else run here. Two variants, each on a fresh cluster:
#   kill       the primary's Patroni and postgres are killed with SIGKILL (the kernel
#              answers with RST);
#   blackhole  the primary's machine vanishes: a blackhole route in its namespace towards
#              this side drops everything it sends (no RST, no ICMP, as when it loses power
#              or its uplink); Patroni promotes node2 when node1's leader key expires.
# Asserts, for each: /readyz 503 within 5 s of the failure while no primary is reachable,
# 200 within 5 s of the promotion, ingest resumed within 30 s of the promotion, and every
# seq of each agent exactly once (after the agents are drained).
#
#   sudo scripts/test-failover.sh [kill|blackhole]...   (root; Debian/Ubuntu; both by default)
#
# Needs: patroni, etcd-server (scripts/setup installs them), PostgreSQL 15 binaries under
# /usr/lib/postgresql/15/bin, curl, psql, iproute2, and the debug binaries in
# $CARGO_TARGET_DIR (default /var/cache/edgeprobe-target; built when missing). Everything
# runs in a temp dir on ports of its own (PostgreSQL 5441/5442, Patroni REST 8011/8012,
# etcd 2391/2392) and the namespace epfailover (10.231.7.0/30); the server on 5432 is not
# touched. Prints the figures (time to promotion, /readyz, time from the promotion to the
# first commit); every check prints "ok" or "FAIL"; the exit status is the number of
# failures (capped at 100). KEEP=1 keeps the temp dir (logs) for a look.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/edgeprobe-target}
bin=$CARGO_TARGET_DIR/debug
pgbin=/usr/lib/postgresql/15/bin
pg_ports=(5441 5442)
rest_ports=(8011 8012)
etcd_client=2391
etcd_peer=2392
ns=epfailover
here=10.231.7.1   # this side of the veth: etcd, node2, the collector
there=10.231.7.2  # node1, in the namespace
addrs=("$there" "$here")
# docs/SCALING.md's URL, without its TLS parameters.
url="postgres://postgres@$there:${pg_ports[0]},$here:${pg_ports[1]}/edgeprobe?target_session_attrs=read-write"
# The script's own queries: psql's libpq waits 2 min on a silent host without this.
q_url="$url&connect_timeout=2"
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(kill blackhole)

[ "$(id -u)" = 0 ] || { echo "test-failover.sh: run as root" >&2; exit 1; }
for v in "${variants[@]}"; do
    case $v in kill|blackhole) ;; *) echo "test-failover.sh: unknown variant $v (kill, blackhole)" >&2; exit 2 ;; esac
done
# One system test at a time (the packaging and Ansible tests take the same lock).
exec 9>/run/lock/edgeprobe-system-test.lock
if ! flock -w 900 9; then echo "test-failover.sh: another system test holds the lock" >&2; exit 1; fi

top=$(mktemp -d /tmp/edgeprobe-failover.XXXXXX)
chmod 0755 "$top"
failures=0
pids=()

log() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok   - %s\n' "$1"; }
fail() { printf 'FAIL - %s\n' "$1"; failures=$((failures + 1)); }
expect() {
    if [ "$2" = "$3" ]; then ok "$1 ($2)"; else fail "$1: got '$2', want '$3'"; fi
}
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$1 - $2:.1f}')"; }
# less A B: true when A < B (decimals).
less() { python3 -c "import sys; sys.exit(0 if $1 < $2 else 1)"; }

# Stops what a variant started and removes the namespace.
teardown() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    # Postgres started by Patroni outlives a killed Patroni: stop what is left by its pid file.
    for n in 1 2; do
        f=${work:-/nonexistent}/node$n/data/postmaster.pid
        [ -f "$f" ] && kill -KILL "$(head -1 "$f")" 2>/dev/null
    done
    wait 2>/dev/null
    pids=()
    ip netns del $ns 2>/dev/null
    ip link del ${ns}h 2>/dev/null
}
cleanup() {
    trap - EXIT
    teardown
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $top"; else rm -rf "$top"; fi
}
trap cleanup EXIT

for port in "${pg_ports[@]}" "${rest_ports[@]}" $etcd_client $etcd_peer; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "test-failover.sh: port $port is in use" >&2; exit 1
    fi
done
command -v patroni >/dev/null && command -v etcd >/dev/null || scripts/setup
if [ ! -x "$bin/edgeprobe-collector" ] || [ ! -x "$bin/edgeprobe-agent" ]; then
    cargo build --locked -q -p edgeprobe-collector -p edgeprobe-agent || exit 1
fi

# wait_for SECONDS WHAT COMMAND...: polls every 0.2 s.
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$end" ]; then fail "$what within ${limit}s"; return 1; fi
        sleep 0.2
    done
}
rest() { echo "${addrs[$1]}:${rest_ports[$1]}"; }
role_of() { curl -fsS --max-time 1 "http://$(rest "$1")/patroni" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["role"])' 2>/dev/null; }
is_primary() { [ "$(role_of "$1")" = master ] || [ "$(role_of "$1")" = primary ]; }
is_replica() { [ "$(role_of "$1")" = replica ] && curl -fsS --max-time 1 "http://$(rest "$1")/replica" >/dev/null; }
readyz() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://$http/readyz"; }
node_url() { echo "postgres://postgres@${addrs[$1]}:${pg_ports[$1]}/$2?connect_timeout=1"; }

# Execs (runuser would fork): the pids below are etcd's and Patroni's own.
as_postgres=(setpriv --reuid=postgres --regid=postgres --init-groups --)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# variant kill|blackhole: a fresh cluster, collector and agents; the failure; the checks.
variant() {
    local how=$1
    work=$top/$how
    mkdir -p "$work"

    log "[$how] node1 in namespace $ns ($there), etcd and node2 here ($here)"
    ip netns add $ns || { fail "ip netns add $ns"; return; }
    ip link add ${ns}h type veth peer name ${ns}n
    ip link set ${ns}n netns $ns
    ip addr add $here/30 dev ${ns}h
    ip link set ${ns}h up
    ip -n $ns addr add $there/30 dev ${ns}n
    ip -n $ns link set ${ns}n up
    ip -n $ns link set lo up

    mkdir -p "$work/etcd"
    chown postgres: "$work/etcd"
    "${as_postgres[@]}" etcd --name e1 --data-dir "$work/etcd/data" \
        --listen-client-urls "http://127.0.0.1:$etcd_client,http://$here:$etcd_client" --advertise-client-urls "http://$here:$etcd_client" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "e1=http://127.0.0.1:$etcd_peer" >"$work/etcd.log" 2>&1 &
    pids+=($!)
    wait_for 30 "etcd answers" curl -fsS "http://127.0.0.1:$etcd_client/health" || return

    # ttl 10 s: the leader key of a dead or vanished primary expires within 10 s;
    # loop_wait + 2 * retry_timeout must not exceed it.
    patroni_pids=()
    local n i dir
    for n in 1 2; do
        i=$((n - 1))
        dir=$work/node$n
        mkdir -p "$dir"
        cat >"$dir/patroni.yml" <<YAML
scope: edgeprobe-failover
name: node$n
restapi:
  listen: $(rest $i)
  connect_address: $(rest $i)
etcd3:
  hosts: $here:$etcd_client
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    # A commit is acknowledged (and the agent drops its rows) only once the standby has
    # it: without this, the last commits before a crash are lost with the old primary.
    synchronous_mode: true
    postgresql:
      use_pg_rewind: false
      parameters:
        wal_level: replica
        hot_standby: "on"
        max_wal_senders: 5
        max_replication_slots: 5
  initdb:
    - encoding: UTF8
    - auth: trust
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host all all 10.231.7.0/30 trust
    - host replication all 10.231.7.0/30 trust
postgresql:
  listen: ${addrs[$i]}:${pg_ports[$i]}
  connect_address: ${addrs[$i]}:${pg_ports[$i]}
  data_dir: $dir/data
  bin_dir: $pgbin
  pgpass: $dir/pgpass
  authentication:
    superuser:
      username: postgres
    replication:
      username: postgres
  parameters:
    unix_socket_directories: $dir
    max_connections: 50
    shared_buffers: 32MB
YAML
        chown -R postgres: "$dir"
        chmod 0700 "$dir"
        if [ $n = 1 ]; then
            ip netns exec $ns "${as_postgres[@]}" patroni "$dir/patroni.yml" >"$work/patroni$n.log" 2>&1 &
        else
            "${as_postgres[@]}" patroni "$dir/patroni.yml" >"$work/patroni$n.log" 2>&1 &
        fi
        pids+=($!)
        patroni_pids+=($!)
        # The first node bootstraps the cluster; the second clones it.
        if [ $n = 1 ]; then wait_for 90 "node1 becomes the primary" is_primary 0 || { tail -30 "$work/patroni1.log"; return; }; fi
    done
    wait_for 120 "node2 becomes a streaming replica" is_replica 1 || { tail -30 "$work/patroni2.log"; return; }
    wait_for 60 "node2 becomes the synchronous standby" bash -c "[ \"\$(psql -XAtq '$(node_url 0 postgres)' -c 'SELECT sync_state FROM pg_stat_replication')\" = sync ]" || return
    ok "node1 primary on $there:${pg_ports[0]}, node2 synchronous standby on $here:${pg_ports[1]}"
    psql -XAtq "$(node_url 0 postgres)" -c "CREATE DATABASE edgeprobe" || return

    log "[$how] a collector with the multi-host URL and two agents (tcp every 50 ms)"
    grpc=127.0.0.1:$(port)
    http=127.0.0.1:$(port)
    local target=127.0.0.1:$(port)
    cat >"$work/collector.toml" <<TOML
[server]
grpc_listen = "$grpc"
http_listen = "$http"
insecure = true

[database]
url = "$url"
TOML
    "$bin/edgeprobe-collector" check --config "$work/collector.toml" >"$work/check.log" 2>&1 \
        && ok "collector check accepts the multi-host URL" || { fail "collector check accepts the multi-host URL"; cat "$work/check.log"; }
    RUST_LOG=info "$bin/edgeprobe-collector" run --config "$work/collector.toml" >"$work/collector.log" 2>&1 &
    pids+=($!)
    "$bin/edgeprobe-agent" serve-target --listen "$target" >"$work/target.log" 2>&1 &
    pids+=($!)
    agent_config() { # agent_config N [with-tests]
        cat <<TOML
[agent]
id = "failover-$1"
labels = { site = "lab" }
state_dir = "$work/agent-$1"

[collector]
endpoints = ["http://$grpc"]
insecure = true
reconnect_spread = "0s"
TOML
        [ "${2:-}" = with-tests ] && cat <<TOML

[[test]]
name = "tcp"
kind = "tcp"
target = "$target"
every = "50ms"
TOML
    }
    local agent_pids=() a
    for a in 1 2; do
        agent_config $a with-tests >"$work/agent-$a.toml"
        agent_config $a >"$work/agent-$a.drain.toml"
        "$bin/edgeprobe-agent" run --config "$work/agent-$a.toml" >"$work/agent-$a.log" 2>&1 &
        pids+=($!)
        agent_pids+=($!)
    done
    wait_for 60 "the collector is ready" bash -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' http://$http/readyz)\" = 200 ]" \
        || { tail -20 "$work/collector.log"; return; }
    rows() { psql -XAtq "$q_url" -c "SELECT count(*) FROM results" 2>/dev/null; }
    wait_for 30 "results land" bash -c "[ \"\$(psql -XAtq '$q_url' -c 'SELECT count(*) FROM results' 2>/dev/null || echo 0)\" -gt 50 ]"
    sleep 2
    local before
    before=$(rows)
    ok "results landing before the failover ($before rows)"

    local failed
    if [ "$how" = kill ]; then
        log "[$how] SIGKILL the primary's Patroni and postgres"
        local primary_pid
        primary_pid=$(head -1 "$work/node1/data/postmaster.pid")
        failed=$(now)
        kill -KILL "${patroni_pids[0]}" "$primary_pid"
    else
        log "[$how] the primary's machine vanishes: blackhole route in $ns towards $here"
        failed=$(now)
        ip -n $ns route add blackhole $here/32
    fi
    # Watch /readyz and the newest commit until ingest resumes on the new primary.
    local unready="" baseline="" promoted="" resumed="" ready_again="" code t c
    committed() { psql -XAtq "$(node_url 1 edgeprobe)" -c "SELECT coalesce(sum(committed_seq), 0) FROM agents" 2>/dev/null; }
    local end=$(( $(date +%s) + 90 ))
    while [ "$(date +%s)" -lt "$end" ]; do
        code=$(readyz)
        t=$(now)
        if [ -z "$promoted" ]; then
            if is_primary 1; then
                promoted=$(now)
            elif [ "$code" = 503 ]; then
                [ -n "$unready" ] || unready=$t
            elif [ "$code" = 200 ] && ! less "$(secs "$t" "$failed")" 5; then
                # No primary is reachable: the only server left is a read-only replica.
                if ! psql -XAtq "$(node_url 0 edgeprobe)" -c "SELECT 1" >/dev/null 2>&1; then
                    fail "/readyz answers 200 at $(secs "$t" "$failed") s while no primary is reachable"
                fi
            fi
        fi
        if [ -n "$promoted" ] && [ -z "$ready_again" ] && [ "$code" = 200 ]; then ready_again=$t; fi
        if [ -n "$promoted" ] && [ -z "$resumed" ]; then
            # A commit on the new primary: the agents' watermarks move past where they
            # stood at the promotion.
            c=$(committed)
            if [ -z "$baseline" ]; then baseline=$c; elif [ -n "$c" ] && [ "$c" -gt "$baseline" ]; then resumed=$(now); fi
        fi
        [ -n "$resumed" ] && [ -n "$ready_again" ] && break
        sleep 0.2
    done
    if [ -z "$promoted" ]; then fail "[$how] node2 promoted within 90 s"; tail -30 "$work/patroni2.log"; return; fi
    echo "figure: [$how] promotion $(secs "$promoted" "$failed") s after the failure"
    if [ -n "$unready" ]; then
        echo "figure: [$how] /readyz 503 $(secs "$unready" "$failed") s after the failure"
        less "$(secs "$unready" "$failed")" 5 && ok "[$how] /readyz 503 within 5 s of the failure" \
            || fail "[$how] /readyz 503 within 5 s of the failure ($(secs "$unready" "$failed") s)"
    else
        fail "[$how] /readyz 503 while no primary was reachable"
    fi
    if [ -n "$ready_again" ]; then
        echo "figure: [$how] /readyz 200 again $(secs "$ready_again" "$promoted") s after the promotion"
        less "$(secs "$ready_again" "$promoted")" 5 && ok "[$how] /readyz 200 within 5 s of the promotion" \
            || fail "[$how] /readyz 200 within 5 s of the promotion ($(secs "$ready_again" "$promoted") s)"
    else
        fail "[$how] /readyz 200 again after the promotion"
    fi
    if [ -n "$resumed" ]; then
        echo "figure: [$how] first commit $(secs "$resumed" "$promoted") s after the promotion"
        less "$(secs "$resumed" "$promoted")" 30 && ok "[$how] ingest resumed within 30 s of the promotion" \
            || fail "[$how] ingest resumed within 30 s of the promotion ($(secs "$resumed" "$promoted") s)"
    else
        fail "[$how] ingest resumed within 90 s of the failure"
    fi

    log "[$how] drain the agents; every seq lands exactly once"
    sleep 3
    local pid last got drain_pid
    for pid in "${agent_pids[@]}"; do kill -TERM "$pid"; done
    for pid in "${agent_pids[@]}"; do wait "$pid" 2>/dev/null; done
    for a in 1 2; do
        last=$(( $("$bin/edgeprobe-agent" buffer --config "$work/agent-$a.toml" | awk -F'  +' '$1=="next seq"{print $2}' | awk '{print $1}') - 1 ))
        "$bin/edgeprobe-agent" run --config "$work/agent-$a.drain.toml" >"$work/agent-$a.drain.log" 2>&1 &
        drain_pid=$!
        pids+=($drain_pid)
        wait_for 60 "[$how] agent $a drained (committed seq $last)" bash -c \
            "[ \"\$(psql -XAtq '$q_url' -c \"SELECT committed_seq FROM agents WHERE agent_id = 'failover-$a'\")\" -ge $last ]"
        kill -TERM $drain_pid; wait $drain_pid 2>/dev/null
        got=$(psql -XAtq "$q_url" -c "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM results WHERE agent_id = 'failover-$a'" | tr '|' ' ')
        expect "[$how] agent $a: rows, distinct seqs, first and last seq" "$got" "$last $last 1 $last"
    done
    echo "figure: [$how] $before rows before the failure, $(rows) after the drain"
    grep -c "read_only\|25006" "$work/collector.log" | sed "s/^/[$how] collector log lines about read-only errors: /"
    grep "postgres primary reached\|no writable postgres" "$work/collector.log" | sed "s/^/[$how] collector: /" | cut -c1-240
}

for v in "${variants[@]}"; do
    before_failures=$failures
    variant "$v"
    if [ "$failures" -gt "$before_failures" ] && [ -f "$top/$v/collector.log" ]; then
        echo; echo "[$v] collector log (tail):"; tail -20 "$top/$v/collector.log"
    fi
    teardown
done
echo
echo "test-failover.sh: $failures failure(s)"
exit $((failures > 100 ? 100 : failures))
