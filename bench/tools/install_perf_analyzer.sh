#!/usr/bin/env bash
# Install a working Triton `perf_analyzer` into the git-ignored cache
# <repo>/.cache/perf_analyzer/, without touching the system (no apt install,
# no change to /etc/apt).
#
# Why this is needed: the only real perf_analyzer wheel on PyPI
# (perf-analyzer==2.60.0) is tagged manylinux_2_38_x86_64; its binary needs
# glibc >= 2.38 and GLIBCXX_3.4.32, while Debian 12 ships glibc 2.36.  So we
#   1. `pip download` the wheel and take perf_analyzer/bin/perf_analyzer
#      (the wheel holds no shared libraries, only the binary + a Python shim);
#   2. `apt-get download` Debian 13 (trixie) runtime libraries with a PRIVATE
#      apt state dir (own apt.conf / sources.list / lists / cache) and unpack
#      them with `dpkg-deb -x` into a private sysroot;
#   3. write a wrapper <cache>/bin/perf_analyzer that execs the binary through
#      trixie's ld-linux-x86-64.so.2 --library-path <sysroot libs>.
#
# Idempotent: exits at once if the wrapper is present and `--version` works.
#
# Usage: bench/tools/install_perf_analyzer.sh [--force]
# Env:   PA_VERSION        perf-analyzer version        (default 2.60.0)
#        PA_DEBIAN_MIRROR  Debian mirror URL            (default: derived from
#                          /etc/apt/sources.list(.d), else deb.debian.org)
#        PA_DEBIAN_SUITE   suite for the runtime libs   (default trixie)
#        PYTHON            interpreter whose pip is used (default: repo .venv,
#                          else python3)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
CACHE="$REPO_ROOT/.cache/perf_analyzer"
WRAPPER="$CACHE/bin/perf_analyzer"

PA_VERSION="${PA_VERSION:-2.60.0}"
SUITE="${PA_DEBIAN_SUITE:-trixie}"
# Runtime closure of the binary (NEEDED: libz, libssl, libcrypto, libstdc++,
# libm, libgcc_s, libc, ld-linux) plus libzstd (needed by trixie's libcrypto).
DEBS=(libc6 libstdc++6 libgcc-s1 libssl3t64 zlib1g libzstd1)
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

FORCE=0
for a in "$@"; do
    case "$a" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        *) echo "install_perf_analyzer: unknown argument: $a" >&2; exit 2 ;;
    esac
done

log() { echo "install_perf_analyzer: $*" >&2; }

is_working() {
    [[ -x "$WRAPPER" ]] && "$WRAPPER" --version >/dev/null 2>&1
}

if [[ $FORCE -eq 0 ]] && is_working; then
    exit 0
fi

[[ "$(uname -m)" == x86_64 ]] || { log "only x86_64 is supported"; exit 1; }
for tool in apt-get dpkg-deb unzip; do
    command -v "$tool" >/dev/null || { log "missing required tool: $tool"; exit 1; }
done

# ---------------------------------------------------------------- mirror ----
# Use the mirror the system's own apt sources use for the main Debian archive
# (the entry whose suite is the plain release codename, not -security).
derive_mirror() {
    local codename="" f
    if [[ -r /etc/os-release ]]; then
        codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    fi
    [[ -n "$codename" ]] || return 1
    local files=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] && files+=("$f")
    done
    if ((${#files[@]})); then
        # one-line format: deb [opts] URI suite components...
        awk -v s="$codename" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == s) { print $i; exit }
            }' "${files[@]}" | head -n1
    fi
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        # deb822 format: paragraphs with Types/URIs/Suites/Enabled fields
        awk -v s="$codename" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (k = 1; k <= NF; k++) {
                    line = $k
                    if (line ~ /^#/) continue
                    n = index(line, ":"); if (!n) continue
                    key = tolower(substr(line, 1, n - 1))
                    val = substr(line, n + 1); gsub(/^[ \t]+|[ \t]+$/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled == "no") next
                if ((" " types " ") !~ / deb /) next
                ns = split(suites, sa, /[ \t]+/)
                for (j = 1; j <= ns; j++) if (sa[j] == s) { split(uris, ua, /[ \t]+/); print ua[1]; exit }
            }' "$f"
    done | head -n1
}

MIRROR="${PA_DEBIAN_MIRROR:-}"
if [[ -z "$MIRROR" ]]; then
    MIRROR="$(derive_mirror 2>/dev/null | head -n1 || true)"
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
MIRROR="${MIRROR%/}"
log "Debian mirror: $MIRROR (suite $SUITE)"

# ----------------------------------------------------------------- pip -----
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PY="$REPO_ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/.work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

WHEEL_DIR="$CACHE/wheel"
mkdir -p "$WHEEL_DIR"
WHEEL="$(ls "$WHEEL_DIR"/perf_analyzer-"$PA_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
    log "downloading perf-analyzer==$PA_VERSION wheel"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_38_x86_64 --python-version 3.11 \
        -d "$WHEEL_DIR" "perf-analyzer==$PA_VERSION"
    WHEEL="$(ls "$WHEEL_DIR"/perf_analyzer-"$PA_VERSION"-*.whl | head -n1)"
fi
unzip -q -o "$WHEEL" 'perf_analyzer/bin/*' -d "$WORK/wheel"
[[ -f "$WORK/wheel/perf_analyzer/bin/perf_analyzer" ]] || {
    log "wheel $WHEEL has no perf_analyzer/bin/perf_analyzer"; exit 1; }
mkdir -p "$CACHE/libexec"
install -m 0755 "$WORK/wheel/perf_analyzer/bin/perf_analyzer" "$CACHE/libexec/perf_analyzer"

# ----------------------------------------------------- private apt state ----
APTDIR="$CACHE/apt"
mkdir -p "$APTDIR"/etc/{apt.conf.d,preferences.d,sources.list.d,trusted.gpg.d} \
         "$APTDIR"/state/lists/partial "$APTDIR"/cache/archives/partial
: > "$APTDIR/state/status"
[[ -r "$KEYRING" ]] || { log "missing $KEYRING (package debian-archive-keyring)"; exit 1; }
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$APTDIR/etc/sources.list"

{
    echo "Dir::Etc \"$APTDIR/etc/\";"
    echo "Dir::Etc::main \"apt.conf\";"
    echo "Dir::Etc::parts \"apt.conf.d\";"
    echo "Dir::Etc::sourcelist \"sources.list\";"
    echo "Dir::Etc::sourceparts \"sources.list.d\";"
    echo "Dir::Etc::preferences \"preferences\";"
    echo "Dir::Etc::preferencesparts \"preferences.d\";"
    echo "Dir::Etc::trusted \"trusted.gpg\";"
    echo "Dir::Etc::trustedparts \"trusted.gpg.d\";"
    echo "Dir::State \"$APTDIR/state/\";"
    echo "Dir::State::lists \"lists/\";"
    echo "Dir::State::status \"$APTDIR/state/status\";"
    echo "Dir::Cache \"$APTDIR/cache/\";"
    echo "APT::Architecture \"amd64\";"
    echo "APT::Architectures { \"amd64\"; };"
    echo "APT::Get::List-Cleanup \"false\";"
    echo "Acquire::Languages \"none\";"
    # the _apt sandbox user cannot write into a root-owned private cache
    if [[ "$(id -u)" == 0 ]]; then echo "APT::Sandbox::User \"root\";"; fi
    # carry over a proxy configured for the system's apt (read-only lookup)
    for k in Acquire::http::Proxy Acquire::https::Proxy; do
        v="$(apt-config dump 2>/dev/null | sed -n "s/^$k \"\(.*\)\";\$/\1/Ip" | head -n1 || true)"
        if [[ -n "$v" ]]; then echo "$k \"$v\";"; fi
    done
} > "$APTDIR/apt.conf"

apt_private() { APT_CONFIG="$APTDIR/apt.conf" apt-get -q "$@"; }

log "apt-get update ($SUITE, private state in $APTDIR)"
apt_private update >"$WORK/apt-update.log" 2>&1 || { cat "$WORK/apt-update.log" >&2; exit 1; }

mkdir -p "$WORK/debs"
log "apt-get download ${DEBS[*]}"
(cd "$WORK/debs" && apt_private download "${DEBS[@]}") >"$WORK/apt-download.log" 2>&1 \
    || { cat "$WORK/apt-download.log" >&2; exit 1; }

# ------------------------------------------------------------- sysroot -----
SYSROOT_NEW="$WORK/sysroot"
mkdir -p "$SYSROOT_NEW"
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$SYSROOT_NEW"
done
# drop what the runtime never needs (docs, locales, gconv, gdb helpers)
rm -rf "$SYSROOT_NEW"/usr/share "$SYSROOT_NEW"/usr/lib/x86_64-linux-gnu/gconv
(cd "$WORK/debs" && ls -1 *.deb) > "$SYSROOT_NEW/PACKAGES"
mkdir -p "$CACHE/debs"
cp -f "$WORK"/debs/*.deb "$CACHE/debs/"
rm -rf "$CACHE/sysroot"
mv "$SYSROOT_NEW" "$CACHE/sysroot"
# package indexes and apt binary caches (~90 MB) are not needed any more
rm -rf "$APTDIR/state/lists" "$APTDIR"/cache/*.bin
LIBDIR="$CACHE/sysroot/usr/lib/x86_64-linux-gnu"
[[ -x "$LIBDIR/ld-linux-x86-64.so.2" ]] || { log "no ld-linux-x86-64.so.2 in $LIBDIR"; exit 1; }

# ------------------------------------------------------------- wrapper -----
mkdir -p "$CACHE/bin"
cat > "$WRAPPER.tmp" <<'EOF'
#!/bin/sh
# Generated by bench/tools/install_perf_analyzer.sh: run the manylinux_2_38
# perf_analyzer through Debian trixie's dynamic loader and libraries.
here="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
lib="$here/sysroot/usr/lib/x86_64-linux-gnu"
unset LD_PRELOAD
exec "$lib/ld-linux-x86-64.so.2" \
    --library-path "$lib:$here/sysroot/lib/x86_64-linux-gnu" \
    --argv0 perf_analyzer \
    "$here/libexec/perf_analyzer" "$@"
EOF
chmod 0755 "$WRAPPER.tmp"
mv -f "$WRAPPER.tmp" "$WRAPPER"

# -------------------------------------------------------------- verify -----
# every NEEDED library must resolve inside the sysroot
unresolved="$("$LIBDIR/ld-linux-x86-64.so.2" --library-path "$LIBDIR" --list \
    "$CACHE/libexec/perf_analyzer" | grep -v -e 'linux-vdso' -e "$CACHE/sysroot" || true)"
if [[ -n "$unresolved" ]]; then
    log "warning: libraries resolved outside the private sysroot:"
    echo "$unresolved" >&2
fi
if ! is_working; then
    log "installed wrapper does not run:"
    "$WRAPPER" --version >&2 || true
    exit 1
fi
printf 'perf-analyzer %s\n' "$PA_VERSION" > "$CACHE/VERSION"
cat "$CACHE/sysroot/PACKAGES" >> "$CACHE/VERSION"
log "installed: $WRAPPER ($("$WRAPPER" --version 2>&1 | head -n1))"
