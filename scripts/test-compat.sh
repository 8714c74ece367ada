#!/usr/bin/env bash
# The protocol compatibility test (issue 15): a new agent with the previous release's
# collector, and the previous release's agent with a new collector, keep delivering
# results, and the controller's messages never reach a peer that does not speak them.
#
#   scripts/test-compat.sh [REV]
#
# REV is the previous release (default: the commit before the controller, below). Its
# agent and collector are built from `git archive REV` into $CARGO_TARGET_DIR-compat (kept
# between runs, so only the first run builds the dependencies), then the ignored tests
# `compat::` of the collector's integration tests run with EDGEPROBE_OLD_AGENT and
# EDGEPROBE_OLD_COLLECTOR pointing at those binaries. Needs the git history (a clone, not
# an export) and PostgreSQL like scripts/test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# The last commit before the controller (fleet tests, run-now): edgeprobe.v1 as released.
rev=${1:-aae2b19}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/edgeprobe-target}
old_target=${CARGO_TARGET_DIR%/}-compat
src=$(mktemp -d /tmp/edgeprobe-compat.XXXXXX)
trap 'rm -rf "$src"' EXIT

git rev-parse --verify -q "$rev^{commit}" >/dev/null || {
  echo "test-compat.sh: $rev is not in this clone's history (a shallow clone?)" >&2
  exit 1
}
echo "building the agent and collector of $rev into $old_target"
git archive "$rev" | tar -x -C "$src"
(cd "$src" && cargo build --locked -q -p edgeprobe-agent -p edgeprobe-collector --bins --target-dir "$old_target")

export EDGEPROBE_OLD_AGENT=$old_target/debug/edgeprobe-agent
export EDGEPROBE_OLD_COLLECTOR=$old_target/debug/edgeprobe-collector
"$EDGEPROBE_OLD_AGENT" --version
"$EDGEPROBE_OLD_COLLECTOR" --version
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked -p edgeprobe-collector --run-ignored only -E 'test(compat::)'
else
  cargo test --locked -p edgeprobe-collector --test it -- --ignored compat::
fi
