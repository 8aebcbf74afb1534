#!/usr/bin/env bash
# Install `prometheus` and `promtool` into the git-ignored cache <repo>/.cache/prometheus/,
# without registering anything on the system (no `apt-get install`: that would pull libjs-*
# packages and enable a root service). The Debian package is downloaded with
# `apt-get download` and unpacked with `dpkg-deb -x` (see docs: tooling.md section 4).
# Debian 12 ships 2.42.0+ds-5+deb12u1; its binaries link against libc only.
#
# Idempotent: exits at once when <cache>/bin/promtool already runs.
# Prints the cache's bin directory on stdout (the only stdout line), logs on stderr.
#
# Usage: scripts/install_prometheus.sh [--force]
# Env:   PROMETHEUS_DEB   path of an already downloaded prometheus_*.deb (offline machines)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE="$REPO_ROOT/.cache/prometheus"
BIN="$CACHE/bin"

FORCE=0
for a in "$@"; do
    case "$a" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        *) echo "install_prometheus: unknown argument: $a" >&2; exit 2 ;;
    esac
done

log() { echo "install_prometheus: $*" >&2; }

is_working() {
    [[ -x "$BIN/promtool" && -x "$BIN/prometheus" ]] \
        && "$BIN/promtool" --version >/dev/null 2>&1 \
        && "$BIN/prometheus" --version >/dev/null 2>&1
}

if [[ $FORCE -eq 0 ]] && is_working; then
    echo "$BIN"
    exit 0
fi

command -v dpkg-deb >/dev/null || { log "missing required tool: dpkg-deb"; exit 1; }
mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/.work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

DEB="${PROMETHEUS_DEB:-}"
if [[ -z "$DEB" ]]; then
    DEB="$(ls "$CACHE"/prometheus_*.deb 2>/dev/null | head -n1 || true)"
fi
if [[ -z "$DEB" ]]; then
    command -v apt-get >/dev/null || { log "no apt-get and no PROMETHEUS_DEB given"; exit 1; }
    # The package lists may be missing on a fresh machine; refreshing them needs root, which
    # changes no installed package. Without root we can only use the lists that are there.
    if ! apt-cache show prometheus >/dev/null 2>&1; then
        if [[ "$(id -u)" == 0 ]]; then
            log "apt-get update (package lists lack prometheus)"
            apt-get -q update >"$WORK/update.log" 2>&1 || { cat "$WORK/update.log" >&2; exit 1; }
        else
            log "the apt package lists have no 'prometheus' and refreshing them needs root"
            exit 1
        fi
    fi
    log "apt-get download prometheus"
    (cd "$WORK" && apt-get -q download prometheus) >"$WORK/download.log" 2>&1 \
        || { cat "$WORK/download.log" >&2; exit 1; }
    DEB="$(ls "$WORK"/prometheus_*.deb | head -n1)"
    cp -f "$DEB" "$CACHE/"
    DEB="$CACHE/$(basename "$DEB")"
fi
[[ -f "$DEB" ]] || { log "not a file: $DEB"; exit 1; }

log "unpacking $(basename "$DEB")"
dpkg-deb -x "$DEB" "$WORK/root"
for tool in prometheus promtool; do
    [[ -x "$WORK/root/usr/bin/$tool" ]] || { log "$DEB has no usr/bin/$tool"; exit 1; }
done
# Only the two binaries are kept (the package's web assets, man pages and systemd unit are
# not needed to lint expositions or to run a throwaway scraper in tests).
mkdir -p "$WORK/bin"
install -m 0755 "$WORK/root/usr/bin/prometheus" "$WORK/root/usr/bin/promtool" "$WORK/bin/"
rm -rf "$BIN"
mv "$WORK/bin" "$BIN"

if ! is_working; then
    log "installed binaries do not run:"
    "$BIN/promtool" --version >&2 || true
    exit 1
fi
"$BIN/promtool" --version 2>&1 | head -n1 > "$CACHE/VERSION"
log "installed: $BIN ($(cat "$CACHE/VERSION"))"
echo "$BIN"
