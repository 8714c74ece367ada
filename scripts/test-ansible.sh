#!/usr/bin/env bash
# The Ansible test (issue 8): lints ansible/ with the production profile, then really
# runs the roles against this machine (connection local) with the freshly built .debs:
# CA and certificates on the "controller", collector and agent installed and templated,
# the templated agent config checked; runs the playbook again and requires changed=0;
# then starts the collector and the agent from the playbook's files with the units'
# command lines and credentials (no systemd as PID 1 here) and counts the agent's rows
# in PostgreSQL. A last run forces a certificate renewal and a test change and checks
# that exactly those tasks change.
#
#   sudo scripts/test-ansible.sh            (root; Debian/Ubuntu with dpkg)
#
# Needs: ansible (apt) and ansible-lint (pip), installed when missing; cargo-deb,
# cargo-generate-rpm when the packages are not built yet; openssl; PostgreSQL
# reachable as $EDGEPROBE_ANSIBLETEST_PG (default postgres://postgres@127.0.0.1:5432).
# It leaves the machine as it found it: packages purged, user and /etc/edgeprobe gone,
# throwaway database dropped. Every check prints "ok" or "FAIL"; the exit status is the
# number of failures (capped at 100). The logs of the last run are kept in
# /tmp/edgeprobe-ansibletest-logs/.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
export DEBIAN_FRONTEND=noninteractive
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 PY_COLORS=0
default_pg=postgres://postgres@127.0.0.1:5432
[ -z "${DATABASE_URL:-}" ] || default_pg=${DATABASE_URL%/*}
pg=${EDGEPROBE_ANSIBLETEST_PG:-$default_pg}
db=edgeprobe_ansibletest
grpc_port=17743
http_port=19764
work=$(mktemp -d /tmp/edgeprobe-ansibletest.XXXXXX)
logs=/tmp/edgeprobe-ansibletest-logs
chmod 0755 "$work"
failures=0
pids=()
started=$SECONDS

log() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - started))"; }
ok() { printf 'ok   - %s\n' "$1"; }
fail() { printf 'FAIL - %s\n' "$1"; failures=$((failures + 1)); }
check() {
    local what=$1; shift
    local output
    if output=$("$@" 2>&1); then ok "$what"; else fail "$what"; printf '%s\n' "$output" | sed 's/^/       /' | tail -20; fi
}
expect() {
    if [ "$2" = "$3" ]; then ok "$1 ($2)"; else fail "$1: got '$2', want '$3'"; fi
}
contains() {
    if grep -qF -- "$3" <<<"$2"; then ok "$1"; else fail "$1: '$3' not in:"; printf '%s\n' "$2" | sed 's/^/       /' | head -30; fi
}
mode_of() { stat -c '%a %U:%G' "$1" 2>/dev/null || echo missing; }
pkg_status() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || echo not-installed; }
# recap FIELD LOGFILE: the sum of FIELD (ok, changed, failed, ...) over the PLAY RECAP.
recap() {
    sed -n '/^PLAY RECAP/,$p' "$2" | grep -oE "(^|[[:space:]])$1=[0-9]+" | cut -d= -f2 |
        awk '{ s += $1 } END { print s + 0 }'
}
psql_db() { psql "$pg/$db" -Atc "$1" 2>/dev/null; }

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null
    dpkg --purge edgeprobe-agent edgeprobe-collector >/dev/null 2>&1 || true
    # Purge keeps a tls directory holding certificates the operator (here: the roles) put
    # there, and with it /etc/edgeprobe and the user; this test made them, so they go.
    rm -rf /etc/edgeprobe /var/cache/edgeprobe-packages
    if getent passwd edgeprobe >/dev/null; then userdel edgeprobe 2>/dev/null || true; fi
    if getent group edgeprobe >/dev/null; then groupdel edgeprobe 2>/dev/null || true; fi
    psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    # The collector role configured the PostgreSQL exporter (installed by scripts/setup):
    # put its defaults file back as the package shipped it.
    if [ -e "$work/exporter-defaults.orig" ]; then
        cp -p "$work/exporter-defaults.orig" /etc/default/prometheus-postgres-exporter
    fi
    # The playbook and process logs outlive the run, for a failure in CI.
    rm -rf "$logs" && mkdir -p "$logs" && cp "$work"/*.log "$logs"/ 2>/dev/null
    rm -rf "$work"
}

[ "$(id -u)" = 0 ] || { echo "test-ansible.sh: run as root" >&2; exit 1; }
# Tests that install the packages share one machine-wide state (dpkg, the edgeprobe user,
# /etc/edgeprobe); one at a time. Another such test takes the same lock.
exec 9>/run/lock/edgeprobe-system-test.lock
if ! flock -w 900 9; then echo "test-ansible.sh: another system test holds the lock" >&2; exit 1; fi
for pkg in edgeprobe-agent edgeprobe-collector; do
    if [ "$(pkg_status $pkg)" != not-installed ]; then
        echo "test-ansible.sh: $pkg is on this machine; purge it first" >&2; exit 1
    fi
done
if getent passwd edgeprobe >/dev/null || [ -e /etc/edgeprobe ]; then
    echo "test-ansible.sh: user edgeprobe or /etc/edgeprobe exists; the test needs a clean machine" >&2; exit 1
fi
trap cleanup EXIT
if [ -e /etc/default/prometheus-postgres-exporter ]; then
    mkdir -p "$work" && cp -p /etc/default/prometheus-postgres-exporter "$work/exporter-defaults.orig"
fi

# ---------------------------------------------------------------------------------------
log "tools"
if ! command -v ansible-playbook >/dev/null; then
    apt-get install -y ansible >/dev/null || { fail "apt-get install ansible"; exit 1; }
fi
if ! command -v ansible-lint >/dev/null; then
    pip install --quiet ansible-lint || { fail "pip install ansible-lint"; exit 1; }
    hash -r
fi
# EDGEPROBE_ANSIBLE_PLAYBOOK picks another ansible-playbook (e.g. Debian's, 2.14).
ansible_playbook=${EDGEPROBE_ANSIBLE_PLAYBOOK:-ansible-playbook}
printf '       %s\n' "$("$ansible_playbook" --version | head -1)" "$(ansible-lint --version 2>/dev/null | head -1)"

log "packages: the .debs of this tree"
# Built fresh for this run unless EDGEPROBE_DIST names packages: debs kept in the shared
# target dir from an earlier tree would test that tree's binaries, not this one's.
dist=${EDGEPROBE_DIST:-$work/dist}
if ! ls "$dist"/edgeprobe-agent_*.deb "$dist"/edgeprobe-collector_*.deb >/dev/null 2>&1; then
    EDGEPROBE_DIST=$dist scripts/package.sh >"$work/package.log" 2>&1 ||
        { fail "scripts/package.sh"; tail -20 "$work/package.log"; exit 1; }
fi
agent_deb=$(ls "$dist"/edgeprobe-agent_*.deb | head -1)
collector_deb=$(ls "$dist"/edgeprobe-collector_*.deb | head -1)
ok "agent package $(basename "$agent_deb")"
ok "collector package $(basename "$collector_deb")"
# The controller side of the CA role needs the binary before the packages are installed.
ca_command=$CARGO_TARGET_DIR/release/edgeprobe-collector
if ! "$ca_command" cert issue --help >/dev/null 2>&1; then
    dpkg-deb -x "$collector_deb" "$work/collector-pkg"
    ca_command=$work/collector-pkg/usr/bin/edgeprobe-collector
fi
check "edgeprobe-collector on the controller knows cert issue" "$ca_command" cert issue --help
agent_bin=$work/agent-pkg/usr/bin/edgeprobe-agent
dpkg-deb -x "$agent_deb" "$work/agent-pkg"

# ---------------------------------------------------------------------------------------
log "ansible-lint --profile production"
lint_out=$(cd ansible && ansible-lint --profile production 2>&1)
lint_rc=$?
printf '%s\n' "$lint_out" | tail -3 | sed 's/^/       /'
expect "ansible-lint --profile production exit status" "$lint_rc" 0
contains "ansible-lint ran the production profile" "$lint_out" "Profile 'production' was required, and it passed"
check "syntax of the example inventory and site.yml" \
    sh -c "cd ansible && ansible-playbook -i inventory/example/hosts.yml --syntax-check site.yml"

log "the example inventory's agent configs pass edgeprobe-agent check"
# The role's template rendered on the controller with each example host's variables.
mkdir -p "$work/example"
cat >"$work/example/render.yml" <<EOF
- name: Render agent.toml for every example agent
  hosts: edgeprobe_agents
  gather_facts: false
  vars:
    ansible_connection: local
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
    ansible_managed: rendered by test-ansible.sh
  tasks:
    - name: Render
      ansible.builtin.copy:
        content: "{{ lookup('template', '$root/ansible/roles/edgeprobe_agent/templates/agent.toml.j2') }}"
        dest: "$work/example/{{ inventory_hostname }}.toml"
        mode: "0644"
      vars:
        edgeprobe_agent_all_tests: "{{ edgeprobe_agent_tests + edgeprobe_agent_group_tests + edgeprobe_agent_host_tests }}"
EOF
# The role's defaults, at the precedence of role defaults' nearest inventory kin: group all.
mkdir -p "$work/example/defaults/group_vars"
cp ansible/roles/edgeprobe_agent/defaults/main.yml "$work/example/defaults/group_vars/all.yml"
printf 'all: {}\n' >"$work/example/defaults/hosts.yml"
render_out=$(cd ansible && "$ansible_playbook" -i "$work/example/defaults/hosts.yml" \
    -i inventory/example/hosts.yml "$work/example/render.yml" 2>&1)
check "render the example agents' agent.toml" test "$(recap failed <(printf '%s\n' "$render_out"))" = 0
rendered=0
for f in "$work"/example/*.toml; do
    [ -e "$f" ] || continue
    rendered=$((rendered + 1))
    check "$(basename "$f"): $("$agent_bin" check --offline --config "$f" 2>&1)" "$agent_bin" check --offline --config "$f"
done
expect "example agents rendered" "$rendered" 3
contains "berlin-02 has the site's and its own tests" "$(cat "$work/example/berlin-02.example.net.toml" 2>&1)" 'name = "erp-http"'

# ---------------------------------------------------------------------------------------
log "the playbook against localhost"
psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
check "create database $db" psql "$pg/postgres" -qc "CREATE DATABASE $db"
# One host that is both the collector and an agent, the site.yml of the example, and
# the CA on the "controller" in $work/pki.
# A fleet test for the agents of site testsite, applied by the collector role.
cat >"$work/fleet-tests.toml" <<EOF
[[test]]
name = "fleet-port"
kind = "tcp"
target = "127.0.0.1:$http_port"
every = "1s"
select = { site = "testsite" }
EOF
inventory=$work/inventory.yml
cat >"$inventory" <<EOF
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: /usr/bin/python3
    # The test runs as root and this machine has no sudo.
    ansible_become: false
    edgeprobe_ca_command: $ca_command
    edgeprobe_ca_dir: $work/pki/ca
    edgeprobe_ca_certs_dir: $work/pki/certs
  children:
    edgeprobe_collectors:
      hosts:
        localhost:
          edgeprobe_collector_package_file: $collector_deb
          edgeprobe_collector_tls_name: localhost
          edgeprobe_collector_tls_sans: [127.0.0.1]
          edgeprobe_collector_tls_ca_src: $work/pki/ca/ca.pem
          edgeprobe_collector_tls_src_dir: $work/pki/certs
          edgeprobe_collector_grpc_listen: 127.0.0.1:$grpc_port
          edgeprobe_collector_http_listen: 127.0.0.1:$http_port
          edgeprobe_collector_database_url: $pg/$db
          edgeprobe_collector_migrate: true
          edgeprobe_collector_fleet_tests_file: $work/fleet-tests.toml
          edgeprobe_collector_environment: { RUST_LOG: info }
    edgeprobe_agents:
      children:
        site_test:
          vars:
            edgeprobe_agent_labels: { site: testsite }
            edgeprobe_agent_group_tests:
              - name: gateway-ping
                kind: icmp
                target: 127.0.0.1
                every: 1s
                options: { count: 2, interval: 100ms }
          hosts:
            localhost:
              edgeprobe_agent_id: ansible-test-agent
              edgeprobe_agent_package_file: $agent_deb
              edgeprobe_agent_tls_ca_src: $work/pki/ca/ca.pem
              edgeprobe_agent_tls_src_dir: $work/pki/certs
              edgeprobe_agent_collector_endpoints: ["https://localhost:$grpc_port"]
              edgeprobe_agent_tests:
                - name: collector-port
                  kind: tcp
                  target: 127.0.0.1:$http_port
                  every: 1s
              edgeprobe_agent_host_tests:
                - name: collector-health
                  kind: http
                  target: http://127.0.0.1:$http_port/healthz
                  every: 1s
                  options: { expect_status: 200 }
EOF
play() { # LOG [extra ansible-playbook args]
    local out=$1; shift
    (cd ansible && "$ansible_playbook" -i "$inventory" site.yml "$@") >"$out" 2>&1
}

play "$work/run1.log"
run1_rc=$?
expect "first run exit status" "$run1_rc" 0
[ "$run1_rc" = 0 ] || sed 's/^/       /' "$work/run1.log" | tail -40
sed -n '/^PLAY RECAP/,$p' "$work/run1.log" | sed 's/^/       /'
expect "first run: failed" "$(recap failed "$work/run1.log")" 0
check "first run changed something" test "$(recap changed "$work/run1.log")" -gt 0
contains "first run says why the services were left alone" "$(cat "$work/run1.log")" "was not enabled or started"

log "what the first run left"
expect "agent installed" "$(pkg_status edgeprobe-agent)" installed
expect "collector installed" "$(pkg_status edgeprobe-collector)" installed
expect "controller: CA key" "$(mode_of "$work/pki/ca/ca.key")" "600 root:root"
expect "controller: agent key" "$(mode_of "$work/pki/certs/ansible-test-agent.key")" "600 root:root"
expect "controller: collector key" "$(mode_of "$work/pki/certs/localhost.key")" "600 root:root"
contains "agent certificate CN is the agent id" \
    "$(openssl x509 -noout -subject -in "$work/pki/certs/ansible-test-agent.pem")" "CN = ansible-test-agent"
contains "collector certificate names 127.0.0.1" \
    "$(openssl x509 -noout -ext subjectAltName -in "$work/pki/certs/localhost.pem")" "IP Address:127.0.0.1"
for f in ca.pem agent.pem agent.key collector.pem collector.key; do
    expect "host: /etc/edgeprobe/tls/$f" "$(mode_of /etc/edgeprobe/tls/$f)" "640 root:edgeprobe"
done
check "host: agent key is the controller's" cmp "$work/pki/certs/ansible-test-agent.key" /etc/edgeprobe/tls/agent.key
for f in agent.toml collector.toml collector.env; do
    expect "host: /etc/edgeprobe/$f" "$(mode_of /etc/edgeprobe/$f)" "640 root:edgeprobe"
done
agent_toml=$(cat /etc/edgeprobe/agent.toml)
contains "agent.toml: id" "$agent_toml" 'id = "ansible-test-agent"'
contains "agent.toml: labels" "$agent_toml" 'labels = { "site" = "testsite" }'
contains "agent.toml: endpoint" "$agent_toml" "endpoints = [\"https://localhost:$grpc_port\"]"
expect "agent.toml: tests in order fleet, group, host" \
    "$(sed -n 's/^name = "\(.*\)"/\1/p' /etc/edgeprobe/agent.toml | tr '\n' ' ')" "collector-port gateway-ping collector-health "
contains "agent.toml: options inline table" "$agent_toml" 'options = { "count" = 2, "interval" = "100ms" }'
check "edgeprobe-agent check --config /etc/edgeprobe/agent.toml as edgeprobe" \
    runuser -u edgeprobe -- edgeprobe-agent check --config /etc/edgeprobe/agent.toml
contains "collector.env: database URL" "$(cat /etc/edgeprobe/collector.env)" "EDGEPROBE_DATABASE_URL=$pg/$db"
contains "collector.toml: grpc_listen" "$(cat /etc/edgeprobe/collector.toml)" "grpc_listen = \"127.0.0.1:$grpc_port\""
check "migrate ran: schema in $db" test "$(psql_db "SELECT count(*) FROM pg_tables WHERE tablename = 'agents'")" = 1
expect "fleet tests applied: one version, by ansible, from the placed file" \
    "$(psql_db "SELECT count(*) || ' ' || min(split_part(created_by, ' ', 1)) || ' ' || min(origin) FROM fleet_versions")" \
    "1 ansible /etc/edgeprobe/fleet-tests.toml"
if grep -qF "$pg/$db" "$work/run1.log"; then fail "database URL printed in the playbook output"; else ok "database URL not in the playbook output"; fi
if grep -q 'PRIVATE KEY' "$work/run1.log"; then fail "a private key in the playbook output"; else ok "no private key in the playbook output"; fi

log "second run: idempotence"
play "$work/run2.log"
expect "second run exit status" "$?" 0
sed -n '/^PLAY RECAP/,$p' "$work/run2.log" | sed 's/^/       /'
expect "second run: changed" "$(recap changed "$work/run2.log")" 0
expect "second run: failed" "$(recap failed "$work/run2.log")" 0
check "second run: something was checked" test "$(recap ok "$work/run2.log")" -gt 10
expect "second run: no new fleet tests version" "$(psql_db "SELECT count(*) FROM fleet_versions")" 1
grep -E '^changed:' "$work/run2.log" | sed 's/^/       changed by run 2: /'

# ---------------------------------------------------------------------------------------
log "the collector and the agent, from the playbook's files, as their units run them"
# The units' credentials reproduced with setpriv (see test-packaging.sh): systemd is not
# PID 1 here, so the roles skipped the service and this starts each unit's ExecStart.
agent_creds=(setpriv --reuid=edgeprobe --regid=edgeprobe --init-groups --no-new-privs
    --bounding-set=-all,+net_raw --inh-caps=-all,+net_raw --ambient-caps=-all,+net_raw)
collector_creds=(setpriv --reuid=edgeprobe --regid=edgeprobe --init-groups --no-new-privs
    --bounding-set=-all --inh-caps=-all)
unit_line() { sed -n "s/^$2=//p" "/usr/lib/systemd/system/$1.service"; }
collector_start=$(unit_line edgeprobe-collector ExecStart)
(set -a; . /etc/edgeprobe/collector.env; set +a
 exec "${collector_creds[@]}" $collector_start) >"$work/collector.log" 2>&1 &
pids+=("$!")
ready=000
for _ in $(seq 1 60); do
    ready=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/readyz" || true)
    [ "$ready" = 200 ] && break
    sleep 0.25
done
expect "collector /readyz" "$ready" 200
check "agent ExecStartPre" "${agent_creds[@]}" $(unit_line edgeprobe-agent ExecStartPre)
agent_start=$(unit_line edgeprobe-agent ExecStart)
"${agent_creds[@]}" env RUST_LOG=info $agent_start >"$work/agent.log" 2>&1 &
pids+=("$!")
per_test=""
for _ in $(seq 1 60); do
    per_test=$(psql_db "SELECT string_agg(test || '=' || n, ' ' ORDER BY test) FROM
        (SELECT test, count(*) n FROM results WHERE agent_id = 'ansible-test-agent' AND success GROUP BY test) t")
    [ "$(wc -w <<<"$per_test")" = 4 ] && break
    sleep 0.5
done
printf '       successful results per test: %s\n' "${per_test:-none}"
for t in collector-port gateway-ping collector-health fleet-port; do
    check "successful $t results from ansible-test-agent reached PostgreSQL over mTLS" \
        grep -qE "(^| )$t=[1-9]" <<<"$per_test"
done
expect "the agent reports the fleet version it applied" \
    "$(psql_db "SELECT fleet_version FROM agents WHERE agent_id = 'ansible-test-agent'")" 1
expect "agent row with the templated site label" \
    "$(psql_db "SELECT labels->>'site' FROM agents WHERE agent_id = 'ansible-test-agent'")" testsite
if [ "$failures" != 0 ]; then
    sed 's/^/       collector: /' "$work/collector.log" | tail -10
    sed 's/^/       agent: /' "$work/agent.log" | tail -10
fi
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
wait 2>/dev/null
pids=()

# ---------------------------------------------------------------------------------------
log "third run: a renewal and a test change change exactly those"
cert_before=$(openssl x509 -noout -serial -in "$work/pki/certs/ansible-test-agent.pem")
collector_cert_before=$(openssl x509 -noout -serial -in "$work/pki/certs/localhost.pem")
# Renew every certificate expiring within 400 days (all: they are valid for 397).
play "$work/run3.log" --tags agents -e edgeprobe_ca_renew_days=400 \
    -e '{"edgeprobe_agent_host_tests": []}'
expect "third run exit status" "$?" 0
sed -n '/^PLAY RECAP/,$p' "$work/run3.log" | sed 's/^/       /'
changed3=$(grep -E '^(TASK|changed:)' "$work/run3.log" | grep -B1 '^changed:' | sed -n 's/^TASK \[\(.*\)\] \**$/\1/p' | sort | tr '\n' ';')
expect "third run changed these tasks" "$changed3" \
    "edgeprobe_agent : Place the fleet CA and this agent's certificate;edgeprobe_agent : Place this agent's private key;edgeprobe_agent : Template /etc/edgeprobe/agent.toml;edgeprobe_ca : Issue this host's certificate;"
check "agent certificate reissued (new serial)" \
    test "$cert_before" != "$(openssl x509 -noout -serial -in "$work/pki/certs/ansible-test-agent.pem")"
expect "collector certificate untouched (--tags agents)" \
    "$(openssl x509 -noout -serial -in "$work/pki/certs/localhost.pem")" "$collector_cert_before"
check "host has the new agent certificate" cmp "$work/pki/certs/ansible-test-agent.pem" /etc/edgeprobe/tls/agent.pem
expect "agent.toml lost the host test" \
    "$(sed -n 's/^name = "\(.*\)"/\1/p' /etc/edgeprobe/agent.toml | tr '\n' ' ')" "collector-port gateway-ping "
contains "the restart handler was notified (and skipped without systemd)" \
    "$(cat "$work/run3.log")" "RUNNING HANDLER [edgeprobe_agent : Restart edgeprobe-agent]"

log "a config that edgeprobe-agent check refuses is not written"
toml_before=$(sha256sum /etc/edgeprobe/agent.toml)
play "$work/run4.log" --tags agents \
    -e '{"edgeprobe_agent_host_tests": [{"name": "bad", "kind": "icmp", "target": "127.0.0.1", "every": "1ms"}]}'
run4_rc=$?
check "fourth run fails (exit status $run4_rc)" test "$run4_rc" != 0
contains "the validate step names the problem" "$(cat "$work/run4.log")" "must be at least 10ms"
expect "agent.toml unchanged" "$(sha256sum /etc/edgeprobe/agent.toml)" "$toml_before"

# ---------------------------------------------------------------------------------------
log "clean up"
cleanup
trap - EXIT
expect "agent purged" "$(pkg_status edgeprobe-agent)" not-installed
expect "collector purged" "$(pkg_status edgeprobe-collector)" not-installed
check "user edgeprobe gone" sh -c "! getent passwd edgeprobe"
check "/etc/edgeprobe gone" test ! -e /etc/edgeprobe
check "/var/lib/edgeprobe gone" test ! -e /var/lib/edgeprobe
check "database $db dropped" test -z "$(psql "$pg/postgres" -Atc "SELECT 1 FROM pg_database WHERE datname = '$db'")"

log "summary"
if [ "$failures" = 0 ]; then
    echo "all ansible checks passed in $((SECONDS - started))s"
else
    echo "$failures ansible check(s) FAILED"
fi
exit $((failures > 100 ? 100 : failures))
