#!/usr/bin/env bash
# Runs ON THE GPU MACHINE (no internet), in the root of the carried working tree, once per
# device call of the sequence in docs/gpu.md ("Running on a GPU machine"). Each call carries
# one part of the onnxruntime-gpu wheel (scripts/gpu/fetch_ort_gpu_wheel.sh made them) plus
# .whl/parts/manifest.txt and .whl/parts/SHA256SUMS (and the first call .whl/deps/).
#
# Every call: verify the carried part(s) against SHA256SUMS and keep them in $STASH, outside
# the working tree (a later call may re-sync it). When all parts are there: join them, check
# the wheel's sha256 against the manifest, and `pip install --no-index --no-deps --target
# $SITE` the wheel and the deps; then check that `import onnxruntime` with PYTHONPATH=$SITE is
# that wheel. Idempotent: an installed wheel with the manifest's sha256 is not reinstalled.
#
# Exit status: 0 = a part was stashed (parts still missing) or the install is done;
#              1 = an error, or --require-complete and parts are missing.
#
# Usage: bash scripts/gpu/install_on_device.sh [--require-complete]
# Env:   SITE (/tmp/site), STASH (/tmp/microtune-ort-gpu), PYTHON (python3)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
PARTS_DIR="$REPO/.whl/parts"
DEPS_DIR="$REPO/.whl/deps"
SITE="${SITE:-/tmp/site}"
STASH="${STASH:-/tmp/microtune-ort-gpu}"
PYTHON="${PYTHON:-python3}"

REQUIRE_COMPLETE=0
for a in "$@"; do
    case "$a" in
        --require-complete) REQUIRE_COMPLETE=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        *) echo "install_on_device: unknown argument: $a" >&2; exit 2 ;;
    esac
done

log() { echo "install_on_device: $*" >&2; }
die() { log "error: $*"; exit 1; }
field() { sed -n "s/^$1=//p" "$2"; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }

[[ -f "$PARTS_DIR/manifest.txt" && -f "$PARTS_DIR/SHA256SUMS" ]] \
    || die "no .whl/parts/manifest.txt + SHA256SUMS here: carry both with every part"
WHEEL=$(field WHEEL "$PARTS_DIR/manifest.txt")
WHEEL_SHA=$(field WHEEL_SHA256 "$PARTS_DIR/manifest.txt")
PARTS=$(field PARTS "$PARTS_DIR/manifest.txt")
[[ -n "$WHEEL" && -n "$WHEEL_SHA" && "$PARTS" =~ ^[0-9]+$ ]] || die "malformed manifest.txt"

mkdir -p "$STASH/parts" "$STASH/deps"
# A different wheel or split since the last call: start over.
if [[ -f "$STASH/manifest.txt" ]] && ! cmp -s "$STASH/manifest.txt" "$PARTS_DIR/manifest.txt"; then
    log "the manifest changed since the last call: discarding the parts stashed before"
    rm -rf "${STASH:?}/parts" "${STASH:?}/deps" "$STASH/installed"
    mkdir -p "$STASH/parts" "$STASH/deps"
fi
cp "$PARTS_DIR/manifest.txt" "$PARTS_DIR/SHA256SUMS" "$STASH/"

# 1. Stash what this call carried, verified.
shopt -s nullglob
for p in "$PARTS_DIR/$WHEEL".part-*; do
    name=$(basename "$p")
    want=$(awk -v n="$name" '$2 == n || $2 == "*"n {print $1}' "$PARTS_DIR/SHA256SUMS")
    [[ -n "$want" ]] || die "$name is not listed in SHA256SUMS"
    got=$(sha256 "$p")
    [[ "$got" == "$want" ]] || die "$name: sha256 $got, expected $want (transfer damaged?)"
    cp "$p" "$STASH/parts/$name"
    log "stashed $name ($(stat -c %s "$p") bytes, sha256 ok)"
done
if [[ -f "$REPO/.cache/triton-examples/simple_grpc_cudashm_client.py" ]]; then
    # tritonclient's example programs (run_gpu_checks.sh runs them): kept outside the tree too
    mkdir -p "$STASH/examples" && cp "$REPO"/.cache/triton-examples/*.py "$STASH/examples/"
    log "stashed tritonclient's example programs"
fi
if [[ -f "$DEPS_DIR/SHA256SUMS" ]]; then
    (cd "$DEPS_DIR" && sha256sum --quiet -c SHA256SUMS) || die "a wheel in .whl/deps is damaged"
    for w in "$DEPS_DIR"/*.whl; do cp "$w" "$STASH/deps/"; log "stashed $(basename "$w")"; done
fi

# 2. Which parts are there (each re-verified: the stash outlives calls).
missing=()
for ((i = 0; i < PARTS; i++)); do
    suffix=$(printf "%0${#PARTS}d" "$i")
    name="$WHEEL.part-$suffix"
    want=$(awk -v n="$name" '$2 == n || $2 == "*"n {print $1}' "$STASH/SHA256SUMS")
    if [[ ! -f "$STASH/parts/$name" ]] || [[ "$(sha256 "$STASH/parts/$name")" != "$want" ]]; then
        missing+=("$suffix")
    fi
done
if (( ${#missing[@]} )); then
    log "have $((PARTS - ${#missing[@]}))/$PARTS parts; missing: ${missing[*]}"
    if (( REQUIRE_COMPLETE )); then
        die "--require-complete: parts ${missing[*]} were never carried to this machine \
(a fresh machine starts bare: the whole sequence must run on one warm machine)"
    fi
    exit 0
fi

# 3. Join, verify, install (once per wheel).
if [[ -f "$STASH/installed" && "$(cat "$STASH/installed")" == "$WHEEL_SHA" && -d "$SITE/onnxruntime" ]]; then
    log "$WHEEL already installed in $SITE"
else
    log "all $PARTS parts present: joining"
    cat "$STASH/parts/$WHEEL".part-* >"$STASH/$WHEEL"
    got=$(sha256 "$STASH/$WHEEL")
    [[ "$got" == "$WHEEL_SHA" ]] || { rm -f "$STASH/$WHEEL"; die "joined wheel sha256 $got, expected $WHEEL_SHA"; }
    # cuda-bindings and cuda-pathfinder travel for tritonclient's CUDA shm example; where the
    # image has its own (its cupy imports cuda.pathfinder), ours would shadow them: keep theirs.
    image_cuda=0
    env -u PYTHONPATH "$PYTHON" -c "import cuda.bindings.runtime, cuda.pathfinder" 2>/dev/null \
        && image_cuda=1
    deps=()
    for w in "$STASH"/deps/*.whl; do
        case "$(basename "$w")" in
            cuda_bindings-*|cuda_pathfinder-*)
                if (( image_cuda )); then
                    log "the image has cuda-bindings and cuda-pathfinder: $(basename "$w") not installed"
                    continue
                fi ;;
        esac
        deps+=("$w")
    done
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$STASH/$WHEEL" "${deps[@]}"
    echo "$WHEEL_SHA" >"$STASH/installed"
    rm -f "$STASH/$WHEEL"
    log "installed $WHEEL ${deps[*]##*/} into $SITE"
fi

# 4. The import must resolve to $SITE (the image also has a CPU onnxruntime).
PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$SITE" <<'EOF'
import sys
import onnxruntime as ort
site = sys.argv[1]
if not ort.__file__.startswith(site):
    sys.exit(f"onnxruntime resolves to {ort.__file__}, not {site}")
print(f"install_on_device: onnxruntime {ort.__version__} from {ort.__file__}; "
      f"providers {ort.get_available_providers()}", file=sys.stderr)
EOF
