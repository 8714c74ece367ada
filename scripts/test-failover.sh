#!/usr/bin/env bash
# The failover test (issue 16, gap 5): a two-node Patroni cluster of PostgreSQL 15 with one
# etcd on this machine, a collector given both nodes in a multi-host URL
# (target_session_attrs=read-write), two agents landing tcp results every 50 ms; the
# primary's Patroni and postgres are killed with SIGKILL. Asserts: every seq of each agent
# lands exactly once (after the agents are drained), ingest resumes within 30 s of the
# promotion, /readyz answers 503 while no primary is reachable and 200 after.
#
#   sudo scripts/test-failover.sh            (root; Debian/Ubuntu)
#
# Needs: patroni, etcd-server (scripts/setup installs them), PostgreSQL 15 binaries under
# /usr/lib/postgresql/15/bin, curl, psql, and the debug binaries in $CARGO_TARGET_DIR
# (default /var/cache/edgeprobe-target; built when missing). Everything runs in a temp dir
# on ports of its own (PostgreSQL 5441/5442, Patroni REST 8011/8012, etcd 2391/2392);
# the server on 5432 is not touched. Prints the figures (time to promotion, time from the
# promotion to the first commit); every check prints "ok" or "FAIL"; the exit status is the
# number of failures (capped at 100). KEEP=1 keeps the temp dir (logs) for a look.
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
url="postgres://postgres@127.0.0.1:${pg_ports[0]},127.0.0.1:${pg_ports[1]}/edgeprobe?target_session_attrs=read-write&connect_timeout=2"

[ "$(id -u)" = 0 ] || { echo "test-failover.sh: run as root" >&2; exit 1; }
# One system test at a time (the packaging and Ansible tests take the same lock).
exec 9>/run/lock/edgeprobe-system-test.lock
if ! flock -w 900 9; then echo "test-failover.sh: another system test holds the lock" >&2; exit 1; fi

work=$(mktemp -d /tmp/edgeprobe-failover.XXXXXX)
chmod 0755 "$work"
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

cleanup() {
    trap - EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    # Postgres started by Patroni outlives a killed Patroni: stop what is left by its pid file.
    for n in 1 2; do
        f=$work/node$n/data/postmaster.pid
        [ -f "$f" ] && kill -KILL "$(head -1 "$f")" 2>/dev/null
    done
    wait 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
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
role_of() { curl -fsS "http://127.0.0.1:$1/patroni" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["role"])' 2>/dev/null; }
is_primary() { [ "$(role_of "$1")" = master ] || [ "$(role_of "$1")" = primary ]; }
is_replica() { [ "$(role_of "$1")" = replica ] && curl -fsS "http://127.0.0.1:$1/replica" >/dev/null; }
readyz() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://$http/readyz"; }

# Execs (runuser would fork): the pids below are etcd's and Patroni's own.
as_postgres=(setpriv --reuid=postgres --regid=postgres --init-groups --)

log "etcd on $etcd_client and two Patroni nodes of PostgreSQL 15"
mkdir -p "$work/etcd"
chown postgres: "$work/etcd"
"${as_postgres[@]}" etcd --name e1 --data-dir "$work/etcd/data" \
    --listen-client-urls "http://127.0.0.1:$etcd_client" --advertise-client-urls "http://127.0.0.1:$etcd_client" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "e1=http://127.0.0.1:$etcd_peer" >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_for 30 "etcd answers" curl -fsS "http://127.0.0.1:$etcd_client/health" || exit 1

# ttl 10 s: the leader key of a killed primary expires within 10 s; loop_wait + 2 *
# retry_timeout must not exceed it.
patroni_pids=()
for n in 1 2; do
    i=$((n - 1))
    dir=$work/node$n
    mkdir -p "$dir"
    cat >"$dir/patroni.yml" <<YAML
scope: edgeprobe-failover
name: node$n
restapi:
  listen: 127.0.0.1:${rest_ports[$i]}
  connect_address: 127.0.0.1:${rest_ports[$i]}
etcd3:
  hosts: 127.0.0.1:$etcd_client
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
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:${pg_ports[$i]}
  connect_address: 127.0.0.1:${pg_ports[$i]}
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
    "${as_postgres[@]}" patroni "$dir/patroni.yml" >"$work/patroni$n.log" 2>&1 &
    pids+=($!)
    patroni_pids+=($!)
    # The first node bootstraps the cluster; the second clones it.
    if [ $n = 1 ]; then wait_for 90 "node1 becomes the primary" is_primary "${rest_ports[0]}" || { tail -30 "$work/patroni1.log"; exit 1; }; fi
done
wait_for 120 "node2 becomes a streaming replica" is_replica "${rest_ports[1]}" || { tail -30 "$work/patroni2.log"; exit 1; }
wait_for 60 "node2 becomes the synchronous standby" bash -c "[ \"\$(psql -XAtq postgres://postgres@127.0.0.1:${pg_ports[0]}/postgres -c 'SELECT sync_state FROM pg_stat_replication')\" = sync ]" || exit 1
ok "node1 primary on ${pg_ports[0]}, node2 synchronous standby on ${pg_ports[1]}"
psql -XAtq "postgres://postgres@127.0.0.1:${pg_ports[0]}/postgres" -c "CREATE DATABASE edgeprobe" || exit 1

log "a collector with the multi-host URL and two agents (tcp every 50 ms)"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=127.0.0.1:$(port)
http=127.0.0.1:$(port)
target=127.0.0.1:$(port)
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
collector_pid=$!
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
agent_pids=()
for a in 1 2; do
    agent_config $a with-tests >"$work/agent-$a.toml"
    agent_config $a >"$work/agent-$a.drain.toml"
    "$bin/edgeprobe-agent" run --config "$work/agent-$a.toml" >"$work/agent-$a.log" 2>&1 &
    pids+=($!)
    agent_pids+=($!)
done
wait_for 60 "the collector is ready" bash -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' http://$http/readyz)\" = 200 ]" \
    || { tail -20 "$work/collector.log"; exit 1; }
rows() { psql -XAtq "$url" -c "SELECT count(*) FROM results" 2>/dev/null; }
wait_for 30 "results land" bash -c "[ \"\$(psql -XAtq '$url' -c 'SELECT count(*) FROM results' 2>/dev/null || echo 0)\" -gt 50 ]"
sleep 2
before=$(rows)
ok "results landing before the failover ($before rows)"

log "SIGKILL the primary's Patroni and postgres"
primary_pid=$(head -1 "$work/node1/data/postmaster.pid")
killed=$(now)
kill -KILL "${patroni_pids[0]}" "$primary_pid"
# Watch /readyz and the newest commit until ingest resumes on the new primary.
saw_503=no
baseline=""
committed() { psql -XAtq "postgres://postgres@127.0.0.1:$1/edgeprobe?connect_timeout=1" -c "SELECT coalesce(sum(committed_seq), 0) FROM agents" 2>/dev/null; }
promoted=""
resumed=""
ready_again=""
end=$(( $(date +%s) + 90 ))
while [ "$(date +%s)" -lt "$end" ]; do
    code=$(readyz)
    t=$(now)
    if [ -z "$promoted" ]; then
        if is_primary "${rest_ports[1]}"; then
            promoted=$t
        elif [ "$code" = 200 ] && ! less "$(secs "$t" "$killed")" 5; then
            # No primary is reachable: the only server left is a read-only replica. (The
            # collector checks every 2 s with a 2 s timeout: 5 s of grace.)
            if ! psql -XAtq "postgres://postgres@127.0.0.1:${pg_ports[0]}/edgeprobe?connect_timeout=1" -c "SELECT 1" >/dev/null 2>&1; then
                fail "/readyz answers 200 at $(secs "$t" "$killed") s while no primary is reachable"
            fi
        fi
        [ "$code" = 503 ] && saw_503=yes
    fi
    if [ -n "$promoted" ] && [ -z "$ready_again" ] && [ "$code" = 200 ]; then ready_again=$t; fi
    if [ -n "$promoted" ] && [ -z "$resumed" ]; then
        # A commit on the new primary: the agents' watermarks move past where they stood
        # at the promotion.
        n=$(committed "${pg_ports[1]}")
        if [ -z "$baseline" ]; then baseline=$n; elif [ -n "$n" ] && [ "$n" -gt "$baseline" ]; then resumed=$(now); fi
    fi
    [ -n "$resumed" ] && [ -n "$ready_again" ] && break
    sleep 0.2
done
if [ -z "$promoted" ]; then fail "node2 promoted within 90 s"; tail -30 "$work/patroni2.log"; exit 1; fi
echo "figure: promotion $(secs "$promoted" "$killed") s after the SIGKILL"
expect "/readyz answered 503 while no primary was reachable" "$saw_503" yes
if [ -n "$ready_again" ]; then
    ok "/readyz 200 again $(secs "$ready_again" "$promoted") s after the promotion"
else
    fail "/readyz 200 again after the promotion"
fi
if [ -n "$resumed" ]; then
    echo "figure: first commit $(secs "$resumed" "$promoted") s after the promotion"
    less "$(secs "$resumed" "$promoted")" 30 && ok "ingest resumed within 30 s of the promotion" \
        || fail "ingest resumed within 30 s of the promotion ($(secs "$resumed" "$promoted") s)"
else
    fail "ingest resumed within 90 s of the SIGKILL"
fi

log "drain the agents; every seq lands exactly once"
sleep 3
for pid in "${agent_pids[@]}"; do kill -TERM "$pid"; done
for pid in "${agent_pids[@]}"; do wait "$pid" 2>/dev/null; done
for a in 1 2; do
    last=$(( $("$bin/edgeprobe-agent" buffer --config "$work/agent-$a.toml" | awk -F'  +' '$1=="next seq"{print $2}' | awk '{print $1}') - 1 ))
    "$bin/edgeprobe-agent" run --config "$work/agent-$a.drain.toml" >"$work/agent-$a.drain.log" 2>&1 &
    drain_pid=$!
    pids+=($drain_pid)
    wait_for 60 "agent $a drained (committed seq $last)" bash -c \
        "[ \"\$(psql -XAtq '$url' -c \"SELECT committed_seq FROM agents WHERE agent_id = 'failover-$a'\")\" -ge $last ]"
    kill -TERM $drain_pid; wait $drain_pid 2>/dev/null
    got=$(psql -XAtq "$url" -c "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM results WHERE agent_id = 'failover-$a'" | tr '|' ' ')
    expect "agent $a: rows, distinct seqs, first and last seq" "$got" "$last $last 1 $last"
done
after=$(rows)
echo "figure: $before rows before the SIGKILL, $after after the drain"
grep -c "read_only\|25006" "$work/collector.log" | sed 's/^/collector log lines about read-only errors: /'

if [ "$failures" -gt 0 ]; then
    echo; echo "collector log (tail):"; tail -20 "$work/collector.log"
fi
echo
echo "test-failover.sh: $failures failure(s)"
exit $((failures > 100 ? 100 : failures))
