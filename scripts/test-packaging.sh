#!/usr/bin/env bash
# The packaging test (issue 7): builds the four packages, installs, upgrades and purges
# the .debs on this machine, proves the systemd units' command lines start under the
# unit's credentials, inspects the .rpms and installs them into a scratch root.
#
#   sudo scripts/test-packaging.sh            (root; Debian/Ubuntu with dpkg)
#
# Needs: cargo-deb, cargo-generate-rpm, rpm, lintian, systemd (for
# systemd-analyze), curl, PostgreSQL reachable as $EDGEPROBE_PKGTEST_PG (default
# postgres://postgres@127.0.0.1:5432). It leaves the machine as it found it: packages
# purged, user gone, throwaway database dropped. Every check prints "ok" or "FAIL";
# the exit status is the number of failures (capped at 100).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
export DEBIAN_FRONTEND=noninteractive
# The server of $DATABASE_URL (scripts/test sets it, possibly to a throwaway cluster).
default_pg=postgres://postgres@127.0.0.1:5432
[ -z "${DATABASE_URL:-}" ] || default_pg=${DATABASE_URL%/*}
pg=${EDGEPROBE_PKGTEST_PG:-$default_pg}

# Packages, the edgeprobe user and /etc/edgeprobe are machine-wide: one system test at a
# time (scripts/test-ansible.sh takes the same lock).
exec 9>/run/lock/edgeprobe-system-test.lock
if ! flock -w 900 9; then echo "test-packaging.sh: another system test holds the lock" >&2; exit 1; fi
db=edgeprobe_pkgtest
work=$(mktemp -d /tmp/edgeprobe-pkgtest.XXXXXX)
chmod 0755 "$work"
dist=$work/dist
failures=0
pids=()

log() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok   - %s\n' "$1"; }
fail() { printf 'FAIL - %s\n' "$1"; failures=$((failures + 1)); }
# check DESCRIPTION COMMAND...: the command's exit status decides.
check() {
    local what=$1; shift
    local output
    if output=$("$@" 2>&1); then ok "$what"; else fail "$what"; printf '%s\n' "$output" | sed 's/^/       /' | tail -20; fi
}
# expect DESCRIPTION ACTUAL EXPECTED
expect() {
    if [ "$2" = "$3" ]; then ok "$1 ($2)"; else fail "$1: got '$2', want '$3'"; fi
}
# contains DESCRIPTION HAYSTACK NEEDLE
contains() {
    if grep -qF -- "$3" <<<"$2"; then ok "$1"; else fail "$1: '$3' not in:"; printf '%s\n' "$2" | sed 's/^/       /' | head -30; fi
}
lacks() {
    if grep -qF -- "$3" <<<"$2"; then fail "$1: '$3' found"; else ok "$1"; fi
}
verify_unit() {
    local out
    out=$(systemd-analyze verify "$1" 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "$out"; return 1; }
}
mode_of() { stat -c '%a %U:%G' "$1" 2>/dev/null || echo missing; }
pkg_status() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || echo not-installed; }

purge_all() {
    dpkg --purge edgeprobe-agent edgeprobe-collector >/dev/null 2>&1 || true
}
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null
    purge_all
    psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "test-packaging.sh: run as root" >&2; exit 1; }
for pkg in edgeprobe-agent edgeprobe-collector; do
    if [ "$(pkg_status $pkg)" != not-installed ]; then
        echo "test-packaging.sh: $pkg is on this machine; purge it first" >&2; exit 1
    fi
done
if getent passwd edgeprobe >/dev/null; then
    echo "test-packaging.sh: user edgeprobe exists already; the test needs a clean machine" >&2; exit 1
fi

# ---------------------------------------------------------------------------------------
log "build: release binaries, then packages revision 1 and (for the upgrade) revision 2"
if ! EDGEPROBE_DIST=$dist/r1 scripts/package.sh; then fail "scripts/package.sh"; exit 1; fi
EDGEPROBE_DIST=$dist/r2 EDGEPROBE_PKG_REVISION=2 scripts/package.sh --no-build >/dev/null ||
    { fail "scripts/package.sh --no-build (revision 2)"; exit 1; }
agent_deb=$(ls "$dist"/r1/edgeprobe-agent_*.deb)
collector_deb=$(ls "$dist"/r1/edgeprobe-collector_*.deb)
agent_rpm=$(ls "$dist"/r1/edgeprobe-agent-*.rpm)
collector_rpm=$(ls "$dist"/r1/edgeprobe-collector-*.rpm)
check "four packages built" test -f "$agent_deb" -a -f "$collector_deb" -a -f "$agent_rpm" -a -f "$collector_rpm"
for b in edgeprobe-agent edgeprobe-collector; do
    if readelf -S "$CARGO_TARGET_DIR/release/$b" | grep -q '\.symtab'; then
        fail "$b is stripped"
    else
        ok "$b is stripped ($(stat -c %s "$CARGO_TARGET_DIR/release/$b") bytes)"
    fi
done

# ---------------------------------------------------------------------------------------
log "deb metadata and lintian"
for deb in "$agent_deb" "$collector_deb"; do
    name=$(dpkg-deb -f "$deb" Package)
    contains "$name: depends on adduser" "$(dpkg-deb -f "$deb" Depends)" "adduser"
    contains "$name: depends on libc" "$(dpkg-deb -f "$deb" Depends)" "libc6"
    contains "$name: depends on libgcc-s1" "$(dpkg-deb -f "$deb" Depends)" "libgcc-s1"
    contains "$name: maintainer scripts shipped" "$(dpkg-deb -I "$deb")" "postrm"
    lintian_out=$(lintian --fail-on error --display-info "$deb" 2>&1)
    lintian_rc=$?
    printf '%s\n' "$lintian_out" | sed 's/^/       lintian: /'
    expect "$name: lintian has no errors (exit status)" "$lintian_rc" 0
    expect "$name: lintian warnings" "$(grep -c '^W: ' <<<"$lintian_out")" 0
done
contains "agent: conffiles" "$(dpkg-deb --ctrl-tarfile "$agent_deb" | tar -xOf - ./conffiles)" "/etc/edgeprobe/agent.toml"
collector_conffiles=$(dpkg-deb --ctrl-tarfile "$collector_deb" | tar -xOf - ./conffiles)
contains "collector: collector.toml is a conffile" "$collector_conffiles" "/etc/edgeprobe/collector.toml"
contains "collector: collector.env is a conffile" "$collector_conffiles" "/etc/edgeprobe/collector.env"

# ---------------------------------------------------------------------------------------
log "install both .debs"
check "dpkg -i agent and collector (revision 1)" dpkg -i "$agent_deb" "$collector_deb"
expect "agent installed" "$(pkg_status edgeprobe-agent)" installed
expect "collector installed" "$(pkg_status edgeprobe-collector)" installed
expect "edgeprobe-agent --version" "$(edgeprobe-agent --version)" "edgeprobe-agent 0.1.0"
expect "edgeprobe-collector --version" "$(edgeprobe-collector --version)" "edgeprobe-collector 0.1.0"

IFS=: read -r _ _ uid gid _ home shell <<<"$(getent passwd edgeprobe)"
check "user edgeprobe exists" getent passwd edgeprobe
check "group edgeprobe exists" getent group edgeprobe
check "edgeprobe is a system user (uid $uid < 1000)" test "${uid:-99999}" -lt 1000
expect "edgeprobe home" "$home" /var/lib/edgeprobe
expect "edgeprobe shell" "$shell" /usr/sbin/nologin
expect "edgeprobe primary group" "$(getent group "$gid" | cut -d: -f1)" edgeprobe

expect "mode /usr/bin/edgeprobe-agent" "$(mode_of /usr/bin/edgeprobe-agent)" "755 root:root"
expect "mode /usr/bin/edgeprobe-collector" "$(mode_of /usr/bin/edgeprobe-collector)" "755 root:root"
expect "mode /etc/edgeprobe" "$(mode_of /etc/edgeprobe)" "755 root:root"
expect "mode /etc/edgeprobe/agent.toml" "$(mode_of /etc/edgeprobe/agent.toml)" "644 root:root"
expect "mode /etc/edgeprobe/collector.toml" "$(mode_of /etc/edgeprobe/collector.toml)" "640 root:edgeprobe"
expect "mode /etc/edgeprobe/collector.env" "$(mode_of /etc/edgeprobe/collector.env)" "640 root:edgeprobe"
expect "mode /etc/edgeprobe/tls" "$(mode_of /etc/edgeprobe/tls)" "750 root:edgeprobe"
expect "mode /var/lib/edgeprobe" "$(mode_of /var/lib/edgeprobe)" "750 edgeprobe:edgeprobe"
for u in edgeprobe-agent edgeprobe-collector; do
    expect "mode unit $u.service" "$(mode_of /usr/lib/systemd/system/$u.service)" "644 root:root"
    expect "mode man page $u.1.gz" "$(mode_of /usr/share/man/man1/$u.1.gz)" "644 root:root"
    check "man page $u renders" sh -c "man -l /usr/share/man/man1/$u.1.gz 2>&1 >/dev/null | (! grep .)"
    for f in README copyright changelog.Debian.gz; do
        expect "mode /usr/share/doc/$u/$f" "$(mode_of /usr/share/doc/$u/$f)" "644 root:root"
    done
    # Not enabled at install: neither can work before certificates (and a database) exist.
    check "$u not enabled at install" test ! -e /etc/systemd/system/multi-user.target.wants/$u.service
done
contains "agent man page lists the subcommands" "$(zcat /usr/share/man/man1/edgeprobe-agent.1.gz)" "edgeprobe\\-agent\\-serve\\-target"
for u in edgeprobe-agent edgeprobe-collector; do
    # man finds the page through its own path (as `man edgeprobe-agent` does).
    expect "man -w $u" "$(man -w $u 2>&1)" "/usr/share/man/man1/$u.1.gz"
    check "man -w $u-run (one page per command)" man -w $u-run
    contains "$u man page has the configuration reference" \
        "$(man $u 2>/dev/null | col -b)" "CONFIGURATION"
    expect "bash completion $u" "$(mode_of /usr/share/bash-completion/completions/$u)" "644 root:root"
    expect "zsh completion $u" "$(mode_of /usr/share/zsh/vendor-completions/_$u)" "644 root:root"
    expect "fish completion $u" "$(mode_of /usr/share/fish/vendor_completions.d/$u.fish)" "644 root:root"
    check "bash completion $u parses and registers" \
        bash -c "source /usr/share/bash-completion/completions/$u && complete -p $u"
done
contains "agent man page documents state_dir" "$(man edgeprobe-agent 2>/dev/null | col -b)" 'state_dir = "/var/lib/edgeprobe"'
contains "collector man page documents [fleet] stale_after" "$(man edgeprobe-collector 2>/dev/null | col -b)" "stale_after"

# The agent's credentials, installed as docs/OPERATIONS.md does: `check` refuses a config
# whose TLS files `run` could not read, so it runs here with real ones (id = host name, the
# packaged default). Removed before the purge checks.
pki=$(mktemp -d /tmp/edgeprobe-pkg-pki.XXXXXX)
edgeprobe-collector ca init --dir "$pki/ca" >/dev/null
edgeprobe-collector cert issue --ca "$pki/ca" --name "$(hostname)" --out "$pki" >/dev/null
install -m 0644 -o root -g edgeprobe "$pki/ca/ca.pem" /etc/edgeprobe/tls/ca.pem
install -m 0644 -o root -g edgeprobe "$pki/$(hostname).pem" /etc/edgeprobe/tls/agent.pem
install -m 0640 -o root -g edgeprobe "$pki/$(hostname).key" /etc/edgeprobe/tls/agent.key
rm -rf "$pki"
check "edgeprobe-agent check --config /etc/edgeprobe/agent.toml (root)" \
    edgeprobe-agent check --config /etc/edgeprobe/agent.toml
check "the same check as the service user" \
    runuser -u edgeprobe -- edgeprobe-agent check --config /etc/edgeprobe/agent.toml
expect "agent.toml names the collector once (outside comments)" \
    "$(grep -v '^[[:space:]]*#' /etc/edgeprobe/agent.toml | grep -c 'edgeprobe-collector')" 1
# The collector has no `check` yet: without a database URL it stops right after parsing
# the file, so "no database URL" proves the shipped file parses.
collector_out=$(env -u EDGEPROBE_DATABASE_URL -u DATABASE_URL \
    runuser -u edgeprobe -- edgeprobe-collector run --config /etc/edgeprobe/collector.toml 2>&1)
expect "collector.toml parses; exit 2 for the missing database URL" "$?" 2
contains "collector asks for the database URL" "$collector_out" "no database URL"

# ---------------------------------------------------------------------------------------
log "systemd units"
for u in edgeprobe-agent edgeprobe-collector; do
    unit=/usr/lib/systemd/system/$u.service
    # verify exits 0 on some warnings; any output at all counts as a failure.
    check "systemd-analyze verify $u.service (no output)" verify_unit "$unit"
    security=$(systemd-analyze security --offline=true "$unit" 2>&1 | tail -1)
    printf '       %s\n' "$security"
    score=$(grep -oE '[0-9]+\.[0-9]+' <<<"$security" | head -1)
    check "$u exposure score ${score:-?} <= 2.5 (systemd-analyze security)" \
        awk -v s="${score:-99}" 'BEGIN { exit !(s <= 2.5) }'
done
# The units' settings without their comments.
agent_unit=$(grep -v '^#' /usr/lib/systemd/system/edgeprobe-agent.service)
collector_unit=$(grep -v '^#' /usr/lib/systemd/system/edgeprobe-collector.service)
contains "agent unit grants CAP_NET_RAW ambient" "$agent_unit" "AmbientCapabilities=CAP_NET_RAW"
contains "agent unit bounds to CAP_NET_RAW" "$agent_unit" "CapabilityBoundingSet=CAP_NET_RAW"
check "collector unit has an empty CapabilityBoundingSet" \
    grep -qx 'CapabilityBoundingSet=' /usr/lib/systemd/system/edgeprobe-collector.service
lacks "collector unit grants no ambient capability" "$collector_unit" "AmbientCapabilities"
for u in "$agent_unit" "$collector_unit"; do
    lacks "no PrivateUsers (it breaks ambient capabilities)" "$u" "PrivateUsers"
    for k in User=edgeprobe NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes \
        PrivateTmp=yes PrivateDevices=yes ProtectKernelTunables=yes ProtectControlGroups=yes \
        SystemCallFilter=@system-service SystemCallArchitectures=native RestrictNamespaces=yes \
        MemoryDenyWriteExecute=yes LockPersonality=yes Restart=on-failure ExecReload= \
        ConfigurationDirectory=edgeprobe; do
        contains "unit sets $k" "$u" "$k"
    done
done
contains "agent unit StateDirectory" "$agent_unit" "StateDirectory=edgeprobe"
contains "collector unit reads collector.env" "$collector_unit" "EnvironmentFile=-/etc/edgeprobe/collector.env"

# The unit's credentials, reproduced with setpriv: user and group edgeprobe, no new
# privileges, and the unit's capability sets.
agent_creds=(setpriv --reuid=edgeprobe --regid=edgeprobe --init-groups --no-new-privs
    --bounding-set=-all,+net_raw --inh-caps=-all,+net_raw --ambient-caps=-all,+net_raw)
collector_creds=(setpriv --reuid=edgeprobe --regid=edgeprobe --init-groups --no-new-privs
    --bounding-set=-all --inh-caps=-all)
unit_line() { sed -n "s/^$2=//p" "/usr/lib/systemd/system/$1.service"; }

log "agent: the unit's command lines, by hand, as the unit would run them"
pre=$(unit_line edgeprobe-agent ExecStartPre)
start=$(unit_line edgeprobe-agent ExecStart)
check "ExecStartPre ($pre)" "${agent_creds[@]}" $pre
# Same ExecStart, pointed at a copy of the shipped config with a plaintext collector
# nobody listens on: the agent must come up, write its buffer under /var/lib/edgeprobe
# and wait for the collector.
demo=$work/agent.toml
sed -e 's|^endpoints = .*|endpoints = ["http://127.0.0.1:9"]|' -e 's|^# insecure = true.*|insecure = true|' \
    /etc/edgeprobe/agent.toml >"$demo"
chmod 0644 "$demo"
check "demo config differs from the shipped one only in endpoint and insecure" \
    test "$(diff /etc/edgeprobe/agent.toml "$demo" | grep -c '^>')" = 2
start_demo=${start/\/etc\/edgeprobe\/agent.toml/$demo}
"${agent_creds[@]}" env RUST_LOG=info $start_demo >"$work/agent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
sleep 4
check "agent ($start_demo) still running after 4s" kill -0 "$agent_pid"
check "agent wrote its buffer into the state directory as edgeprobe" \
    sh -c "find /var/lib/edgeprobe -mindepth 1 -user edgeprobe | grep -q ."
check "no file in the state directory owned by anyone else" \
    sh -c "! find /var/lib/edgeprobe -mindepth 1 ! -user edgeprobe | grep -q ."
kill -TERM "$agent_pid"
agent_rc=0
wait "$agent_pid" || agent_rc=$?
expect "agent exits 0 on SIGTERM" "$agent_rc" 0
sed 's/^/       agent: /' "$work/agent.log" | tail -5
check "buffer readable as edgeprobe after shutdown" \
    "${agent_creds[@]}" edgeprobe-agent buffer --config "$demo"
# CAP_NET_RAW (bit 13, 0x2000) is the one capability the agent's process holds.
caps=$("${agent_creds[@]}" grep -E '^Cap(Eff|Bnd|Amb):' /proc/self/status | awk '{print $1 $2}' | tr '\n' ' ')
expect "agent credentials: effective, bounding and ambient = CAP_NET_RAW only" "$caps" \
    "CapEff:0000000000002000 CapBnd:0000000000002000 CapAmb:0000000000002000 "
caps=$("${collector_creds[@]}" grep -E '^Cap(Eff|Bnd|Amb):' /proc/self/status | awk '{print $1 $2}' | tr '\n' ' ')
expect "collector credentials: no capability" "$caps" \
    "CapEff:0000000000000000 CapBnd:0000000000000000 CapAmb:0000000000000000 "
# With that capability an ICMP probe works as the service user (no unprivileged ICMP
# needed). Skipped while the agent's ICMP probe is not built.
icmp_out=$("${agent_creds[@]}" edgeprobe-agent probe icmp 127.0.0.1 --count 2 --interval 100ms --timeout 5s 2>&1)
icmp_rc=$?
if grep -q 'not built yet' <<<"$icmp_out"; then
    printf 'skip - icmp probe as edgeprobe with CAP_NET_RAW (the icmp probe is not built yet)\n'
else
    expect "icmp probe of 127.0.0.1 as edgeprobe with the unit's CAP_NET_RAW" "$icmp_rc" 0
fi

log "collector: the unit's command line, by hand, against a throwaway database"
psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1
check "create database $db" psql "$pg/postgres" -qc "CREATE DATABASE $db"
# The unit's EnvironmentFile: the operator puts the URL there (this also is the conffile
# change that must survive the upgrade below).
printf 'EDGEPROBE_DATABASE_URL=%s/%s\n' "$pg" "$db" >>/etc/edgeprobe/collector.env
start=$(unit_line edgeprobe-collector ExecStart)
demo=$work/collector.toml
http_port=19464
sed -e 's|^# insecure = true.*|insecure = true|' -e 's|^grpc_listen = .*|grpc_listen = "127.0.0.1:17443"|' \
    -e "s|^http_listen = .*|http_listen = \"127.0.0.1:$http_port\"|" /etc/edgeprobe/collector.toml >"$demo"
chmod 0644 "$demo"
start_demo=${start/\/etc\/edgeprobe\/collector.toml/$demo}
# systemd reads EnvironmentFile as root before dropping privileges; so does this.
(set -a; . /etc/edgeprobe/collector.env; set +a
 exec "${collector_creds[@]}" $start_demo) >"$work/collector.log" 2>&1 &
collector_pid=$!
pids+=("$collector_pid")
healthz=000
for _ in $(seq 1 40); do
    healthz=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/healthz" || true)
    [ "$healthz" = 200 ] && break
    sleep 0.25
done
expect "collector /healthz on http_listen" "$healthz" 200
check "collector still running" kill -0 "$collector_pid"
check "collector applied its migrations to $db" \
    sh -c "test \"\$(psql '$pg/$db' -Atc \"SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()\")\" -gt 0"
kill -TERM "$collector_pid"
collector_rc=0
wait "$collector_pid" || collector_rc=$?
expect "collector exits 0 on SIGTERM" "$collector_rc" 0
sed 's/^/       collector: /' "$work/collector.log" | tail -5
psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1

# ---------------------------------------------------------------------------------------
log "upgrade to revision 2 keeps local changes"
sed -i 's|^buffer_max_bytes = .*|buffer_max_bytes = "128MiB"   # changed by the operator|' /etc/edgeprobe/agent.toml
uid_before=$(id -u edgeprobe)
check "dpkg -i revision 2" dpkg -i "$dist"/r2/edgeprobe-agent_*.deb "$dist"/r2/edgeprobe-collector_*.deb
expect "agent upgraded" "$(dpkg-query -W -f='${Version}' edgeprobe-agent)" "0.1.0-2"
expect "collector upgraded" "$(dpkg-query -W -f='${Version}' edgeprobe-collector)" "0.1.0-2"
contains "agent.toml change kept" "$(cat /etc/edgeprobe/agent.toml)" 'buffer_max_bytes = "128MiB"   # changed by the operator'
contains "collector.env change kept" "$(cat /etc/edgeprobe/collector.env)" "EDGEPROBE_DATABASE_URL=$pg/$db"
check "no .dpkg-new or .dpkg-dist left" sh -c "! ls /etc/edgeprobe/*.dpkg-* 2>/dev/null | grep -q ."
expect "collector.env mode kept" "$(mode_of /etc/edgeprobe/collector.env)" "640 root:edgeprobe"
expect "collector.toml mode kept" "$(mode_of /etc/edgeprobe/collector.toml)" "640 root:edgeprobe"
expect "same edgeprobe uid" "$(id -u edgeprobe)" "$uid_before"
check "state directory kept" test -d /var/lib/edgeprobe
check "check still passes" edgeprobe-agent check --config /etc/edgeprobe/agent.toml
check "reinstall of the same version" dpkg -i "$dist"/r2/edgeprobe-agent_*.deb
contains "agent.toml change kept after reinstall" "$(cat /etc/edgeprobe/agent.toml)" "changed by the operator"

# ---------------------------------------------------------------------------------------
log "remove and purge (Debian policy: remove keeps config and state, purge deletes them)"
# The credentials installed above are the operator's files, not the package's.
rm -f /etc/edgeprobe/tls/ca.pem /etc/edgeprobe/tls/agent.pem /etc/edgeprobe/tls/agent.key
check "dpkg --remove edgeprobe-agent" dpkg --remove edgeprobe-agent
check "binary gone after remove" test ! -e /usr/bin/edgeprobe-agent
check "agent.toml kept after remove" test -f /etc/edgeprobe/agent.toml
check "state kept after remove" test -d /var/lib/edgeprobe
check "dpkg --purge edgeprobe-agent" dpkg --purge edgeprobe-agent
check "agent.toml gone after purge" test ! -e /etc/edgeprobe/agent.toml
check "state /var/lib/edgeprobe gone after purge" test ! -e /var/lib/edgeprobe
check "user kept while the collector is installed" getent passwd edgeprobe
check "dpkg --purge edgeprobe-collector" dpkg --purge edgeprobe-collector
check "user edgeprobe gone" sh -c "! getent passwd edgeprobe"
check "group edgeprobe gone" sh -c "! getent group edgeprobe"
check "/etc/edgeprobe gone" test ! -e /etc/edgeprobe
check "statoverrides gone" sh -c "! dpkg-statoverride --list '/etc/edgeprobe/*' | grep -q ."
check "units gone" test ! -e /usr/lib/systemd/system/edgeprobe-agent.service -a ! -e /usr/lib/systemd/system/edgeprobe-collector.service
check "no enablement symlinks left" sh -c "! find /etc/systemd -name 'edgeprobe-*' | grep -q ."

# ---------------------------------------------------------------------------------------
log "rpm: metadata, files, config flags, scripts"
for rpm_file in "$agent_rpm" "$collector_rpm"; do
    info=$(rpm -qip "$rpm_file" 2>/dev/null)
    name=$(rpm -qp --qf '%{NAME}' "$rpm_file" 2>/dev/null)
    expect "$name: version-release" "$(rpm -qp --qf '%{VERSION}-%{RELEASE}' "$rpm_file" 2>/dev/null)" "0.1.0-1"
    contains "$name: license" "$info" "Apache-2.0"
    contains "$name: url" "$info" "https://github.com/edgeprobe/edgeprobe"
    files=$(rpm -qlp "$rpm_file" 2>/dev/null)
    for f in /usr/bin/$name /usr/lib/systemd/system/$name.service /usr/share/man/man1/$name.1.gz \
        /usr/share/man/man1/$name-run.1.gz /usr/share/bash-completion/completions/$name \
        /usr/share/zsh/site-functions/_$name /usr/share/fish/vendor_completions.d/$name.fish \
        /usr/share/doc/$name/README /usr/share/doc/$name/changelog /usr/share/licenses/$name/copyright; do
        contains "$name: ships $f" "$files" "$f"
    done
    scripts=$(rpm -qp --scripts "$rpm_file" 2>/dev/null)
    contains "$name: %pre creates the group" "$scripts" "groupadd -r edgeprobe"
    contains "$name: %pre creates the user" "$scripts" "useradd -r -g edgeprobe"
    contains "$name: %preun stops on erase" "$scripts" "disable --now $name.service"
    contains "$name: %postun restarts on upgrade" "$scripts" "try-restart $name.service"
    requires=$(rpm -qp --requires "$rpm_file" 2>/dev/null)
    contains "$name: requires shadow-utils" "$requires" "shadow-utils"
    contains "$name: requires libc" "$requires" "libc.so.6"
done
expect "agent: config files" "$(rpm -qcp "$agent_rpm" 2>/dev/null)" "/etc/edgeprobe/agent.toml"
expect "collector: config files" "$(rpm -qcp "$collector_rpm" 2>/dev/null | tr '\n' ' ')" \
    "/etc/edgeprobe/collector.env /etc/edgeprobe/collector.toml "
flags() { rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]' "$1" 2>/dev/null; }
contains "agent.toml is %config(noreplace)" "$(flags "$agent_rpm")" "cn -rw-r--r-- root:root /etc/edgeprobe/agent.toml"
contains "collector.toml is %config(noreplace) 0640 root:edgeprobe" "$(flags "$collector_rpm")" "cn -rw-r----- root:edgeprobe /etc/edgeprobe/collector.toml"
contains "collector.env is %config(noreplace) 0640 root:edgeprobe" "$(flags "$collector_rpm")" "cn -rw-r----- root:edgeprobe /etc/edgeprobe/collector.env"
contains "agent binary 0755 root" "$(flags "$agent_rpm")" "-rwxr-xr-x root:root /usr/bin/edgeprobe-agent"

log "rpm: install into a scratch root"
# The scratch root has no shell, so the scriptlets cannot run inside it (--noscripts);
# its passwd/group name the user %pre would create, so file ownership resolves. The
# %pre scriptlet itself runs on this machine below.
scratch=$work/rpmroot
mkdir -p "$scratch/etc"
printf 'root:x:0:0:root:/root:/bin/sh\nedgeprobe:x:999:999::/var/lib/edgeprobe:/sbin/nologin\n' >"$scratch/etc/passwd"
printf 'root:x:0:\nedgeprobe:x:999:\n' >"$scratch/etc/group"
check "rpm --root scratch -i agent and collector" \
    rpm --root "$scratch" --nodeps --noscripts -i "$agent_rpm" "$collector_rpm"
check "rpm database in the scratch root lists both" \
    sh -c "rpm --root '$scratch' -q edgeprobe-agent edgeprobe-collector"
check "rpm --verify (files) in the scratch root" rpm --root "$scratch" -V --nodeps edgeprobe-agent edgeprobe-collector
expect "scratch: agent binary" "$(stat -c '%a %u:%g' "$scratch/usr/bin/edgeprobe-agent")" "755 0:0"
expect "scratch: collector.env" "$(stat -c '%a %u:%g' "$scratch/etc/edgeprobe/collector.env")" "640 0:999"
check "scratch: the installed agent binary runs" "$scratch/usr/bin/edgeprobe-agent" --version
sed -i 's|^buffer_max_bytes = .*|buffer_max_bytes = "64MiB"|' "$scratch/etc/edgeprobe/agent.toml"
check "rpm -U to release 2 in the scratch root" \
    rpm --root "$scratch" --nodeps --noscripts -U "$dist"/r2/edgeprobe-agent-*.rpm
expect "scratch: agent upgraded" "$(rpm --root "$scratch" -q --qf '%{RELEASE}' edgeprobe-agent)" 2
contains "scratch: agent.toml change kept (noreplace)" "$(cat "$scratch/etc/edgeprobe/agent.toml")" 'buffer_max_bytes = "64MiB"'
check "scratch: no .rpmnew for an unchanged packaged file" test ! -e "$scratch/etc/edgeprobe/agent.toml.rpmnew"
check "rpm -e in the scratch root" rpm --root "$scratch" --nodeps --noscripts -e edgeprobe-agent edgeprobe-collector
check "scratch: binaries gone" test ! -e "$scratch/usr/bin/edgeprobe-agent"
check "scratch: modified config saved as .rpmsave" test -f "$scratch/etc/edgeprobe/agent.toml.rpmsave"

log "rpm: the %pre scriptlet, run on this machine"
rpm -qp --qf '%{PREIN}' "$agent_rpm" >"$work/pre.sh" 2>/dev/null
check "%pre runs" sh -e "$work/pre.sh"
IFS=: read -r _ _ uid _ _ home shell <<<"$(getent passwd edgeprobe)"
check "%pre created a system user (uid ${uid:-none})" test "${uid:-99999}" -lt 1000
expect "%pre user home" "${home:-}" /var/lib/edgeprobe
check "%pre is idempotent" sh -e "$work/pre.sh"
userdel edgeprobe 2>/dev/null; groupdel edgeprobe 2>/dev/null
check "clean: user removed again" sh -c "! getent passwd edgeprobe"

# ---------------------------------------------------------------------------------------
log "summary"
if [ "$failures" = 0 ]; then
    echo "all packaging checks passed"
else
    echo "$failures packaging check(s) FAILED"
fi
exit $((failures > 100 ? 100 : failures))
