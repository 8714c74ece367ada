#!/usr/bin/env bash
# Builds the four packages -- edgeprobe-agent and edgeprobe-collector, each as .deb
# (cargo-deb) and .rpm (cargo-generate-rpm) -- into $CARGO_TARGET_DIR/packages/ (or
# $EDGEPROBE_DIST).
#
#   scripts/package.sh                 release build, man pages, completions, 2 x .deb, 2 x .rpm
#   scripts/package.sh --no-build      package the binaries already in $CARGO_TARGET_DIR
#   EDGEPROBE_PKG_REVISION=2 ...       package revision (deb 0.1.0-2, rpm 0.1.0-2)
#
# Needs: cargo-deb, cargo-generate-rpm (cargo install). See
# docs/PACKAGING.md.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
out=${EDGEPROBE_DIST:-$CARGO_TARGET_DIR/packages}
revision=${EDGEPROBE_PKG_REVISION:-1}
build=1
for arg in "$@"; do
    case "$arg" in
    --no-build) build=0 ;;
    *) echo "usage: $0 [--no-build]" >&2; exit 2 ;;
    esac
done

for tool in cargo-deb cargo-generate-rpm; do
    command -v "$tool" >/dev/null || { echo "package.sh: $tool is missing (see docs/PACKAGING.md)" >&2; exit 1; }
done

if [ "$build" = 1 ]; then
    # The collector is stripped by the release profile, the agent by its link
    # (agent/build.rs), so the packaged binaries carry no symbols.
    # Without DT_RELR whatever the packager's shell says: the packages run on glibc 2.34.
    env -u EDGEPROBE_PACK_RELOCS cargo build --release --locked -p edgeprobe-agent -p edgeprobe-collector
fi
bin="$CARGO_TARGET_DIR/release"
for b in edgeprobe-agent edgeprobe-collector; do
    [ -x "$bin/$b" ] || { echo "package.sh: $bin/$b is missing; run without --no-build" >&2; exit 1; }
done

# Man pages and shell completions from the clap definitions (one source with --help): the
# hidden `manpage` command writes BIN.1 (with the configuration reference from
# packaging/etc/*.toml and the sections of packaging/man/BIN.roff) and BIN-SUB.1 per
# command; `completions SHELL` prints the bash, zsh and fish scripts.
rm -rf packaging/build/man packaging/build/completions
mkdir -p packaging/build/completions
for b in edgeprobe-agent edgeprobe-collector; do
    "$bin/$b" manpage --out "packaging/build/man/$b"
    gzip -9n "packaging/build/man/$b"/*.1
    "$bin/$b" completions bash >"packaging/build/completions/$b.bash"
    "$bin/$b" completions zsh >"packaging/build/completions/_$b"
    "$bin/$b" completions fish >"packaging/build/completions/$b.fish"
done

mkdir -p "$out"
rm -f "$out"/edgeprobe-agent[_-]* "$out"/edgeprobe-collector[_-]*
for p in edgeprobe-agent edgeprobe-collector; do
    cargo deb --no-build --locked -p "$p" --deb-revision "$revision" -o "$out/"
    cargo generate-rpm -p "${p#edgeprobe-}" -s "release = \"$revision\"" -o "$out/"
done

echo
echo "packages in $out:"
ls -l "$out"/edgeprobe-*.deb "$out"/edgeprobe-*.rpm
echo "stripped binaries:"
ls -l "$bin/edgeprobe-agent" "$bin/edgeprobe-collector"
