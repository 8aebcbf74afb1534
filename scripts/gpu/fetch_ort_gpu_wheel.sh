#!/usr/bin/env bash
# Runs HERE (a machine with internet): download the onnxruntime-gpu wheel for the offline GPU
# machine, plus the few pure/binary wheels that machine lacks, and split the big wheel into
# parts small enough to travel one per device call (docs/gpu.md, "Running on a GPU machine").
#
# Everything lands in the git-ignored <repo>/.whl/:
#   .whl/<wheel>                      the verified onnxruntime-gpu wheel (sha256 pinned below)
#   .whl/parts/<wheel>.part-<i>       the parts, i = 0..N-1 (`split -n N`: equal sizes)
#   .whl/parts/manifest.txt           WHEEL=, WHEEL_SHA256=, WHEEL_SIZE=, PARTS= (read there)
#   .whl/parts/SHA256SUMS             sha256 of every part
#   .whl/deps/*.whl, .whl/deps/SHA256SUMS   wheels the GPU machine lacks (the front's deps)
#   .whl/parts/PLAN.txt               the carry list of every device call, with its size
#   .whl/perf_analyzer.tar.xz         perf_analyzer (bench/tools) for the GPU benchmark's
#                                     end-to-end section and the 16-core CPU benchmark
#
# A device call sends the working tree (tracked + untracked-not-ignored files) and the carried
# paths, 64 MiB in all. The tree counts (~2.7 MB, 5 parts; ~28 MB and 7 parts while the
# dense_large demo model stored its weights), so N is the smallest number >= 4 of parts that
# fit beside it, with a margin: re-run this script right before the device calls if the tree
# has grown (it re-splits only when N changes).
#
# Usage: scripts/gpu/fetch_ort_gpu_wheel.sh [--parts N] [--force]
# Env:   ORT_GPU_VERSION (1.31.1), ORT_GPU_SHA256 (pinned for 1.31.1 cp312), PY_VERSION (3.12),
#        EXTRA_WHEELS (the front's pinned runtime wheels and the example client's), PYTHON (the
#        repo's .venv python, else python3)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
WHL="$REPO/.whl"
PARTS_DIR="$WHL/parts"
DEPS_DIR="$WHL/deps"

ORT_GPU_VERSION="${ORT_GPU_VERSION:-1.31.1}"
PY_VERSION="${PY_VERSION:-3.12}"
PY_TAG="cp${PY_VERSION/./}"
# From PyPI's simple index (onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl,
# 255,569,273 bytes); only x86-64 manylinux_2_28 wheels exist for Linux.
DEFAULT_SHA="05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7"
if [[ "$ORT_GPU_VERSION" == "1.31.1" && "$PY_VERSION" == "3.12" ]]; then
    ORT_GPU_SHA256="${ORT_GPU_SHA256:-$DEFAULT_SHA}"
else
    ORT_GPU_SHA256="${ORT_GPU_SHA256:-}"
fi
# The GPU image has numpy, onnx, flatbuffers, packaging, pytest and cupy (docs/gpu.md). The
# GPU tests also start whole servers (tests/gpu/test_cuda_shm.py), so the front's runtime
# dependencies travel too, pinned to what the test suite passes with here (with their own
# dependencies; ~16 MB): installed in /tmp/site, ahead of the image's packages, so an image
# grpcio/protobuf of another line cannot break the generated stubs' version checks.
FRONT_WHEELS="grpcio==1.81.1 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 \
protobuf==6.33.6 msgspec==0.22.0 pydantic==2.14.3 pydantic-core==2.50.4 \
pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-extensions==4.16.0 \
typing-inspection==0.4.5 annotated-types==0.8.0 prometheus-client==0.26.0 \
opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-semantic-conventions==0.66b2 \
opentelemetry-instrumentation==0.66b2 opentelemetry-instrumentation-grpc==0.66b2 \
googleapis-common-protos==1.76.0 uvloop==0.23.0 wrapt==2.5.2"
# tritonclient's CUDA shared-memory example (simple_grpc_cudashm_client.py) imports
# cuda.bindings.runtime (cuda-python; its runtime is linked in, only libcuda is needed there):
# run_gpu_checks.sh runs it, with the system shm examples, against a GPU server (~10 MB).
# hypothesis (+ sortedcontainers): run_gpu_checks.sh's tests step also runs
# tests/integration/test_fuzz.py against a CUDA worker (MICROTUNE_FUZZ_DEVICE).
CLIENT_WHEELS="tritonclient==2.73.0 python-rapidjson==1.25 cuda-bindings==13.0.3 \
cuda-pathfinder==1.9.0 hypothesis==6.170.15 sortedcontainers==2.4.0"
EXTRA_WHEELS="${EXTRA_WHEELS:-$FRONT_WHEELS $CLIENT_WHEELS}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

LIMIT=$((64 * 1024 * 1024))      # one device call: working tree + carried paths
MARGIN=$((2 * 1024 * 1024))      # headroom for files added between this run and the calls
MIN_PARTS=4
PARTS=""
FORCE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --parts) PARTS="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        *) echo "fetch_ort_gpu_wheel: unknown argument: $1" >&2; exit 2 ;;
    esac
done

log() { echo "fetch_ort_gpu_wheel: $*" >&2; }
die() { log "error: $*"; exit 1; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }
size_of() { stat -c %s "$1"; }

cd "$REPO"
git check-ignore -q .whl/ || die ".whl/ is not git-ignored (add /.whl/ to .gitignore): \
the wheel must never be committed or sent with the working tree"

# The wheel, its parts and the joined copy for verification: ~3x 256 MB.
avail_kb=$(df -Pk "$REPO" | awk 'NR==2 {print $4}')
(( avail_kb > 1024 * 1024 )) || die "need 1 GiB free under $REPO, have $((avail_kb / 1024)) MiB"

PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
pip_download() {  # dest, requirement...
    local dest="$1"; shift
    local args=()
    for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp "${args[@]}" -d "$dest" "$@"
}

mkdir -p "$WHL" "$PARTS_DIR" "$DEPS_DIR"

# 1. The wheel (skipped when a verified copy is there).
shopt -s nullglob
wheels=("$WHL"/onnxruntime_gpu-"$ORT_GPU_VERSION"-"$PY_TAG"-"$PY_TAG"-*.whl)
if (( FORCE )) || (( ${#wheels[@]} != 1 )); then
    rm -f "$WHL"/onnxruntime_gpu-*.whl
    log "downloading onnxruntime-gpu==$ORT_GPU_VERSION for CPython $PY_VERSION (${PLATFORMS[*]})"
    pip_download "$WHL" "onnxruntime-gpu==$ORT_GPU_VERSION"
    wheels=("$WHL"/onnxruntime_gpu-"$ORT_GPU_VERSION"-"$PY_TAG"-"$PY_TAG"-*.whl)
fi
(( ${#wheels[@]} == 1 )) || die "expected one onnxruntime_gpu wheel in $WHL, found ${#wheels[@]}"
WHEEL_PATH="${wheels[0]}"
WHEEL="$(basename "$WHEEL_PATH")"
WHEEL_SIZE=$(size_of "$WHEEL_PATH")
WHEEL_SHA=$(sha256 "$WHEEL_PATH")
if [[ -n "$ORT_GPU_SHA256" && "$WHEEL_SHA" != "$ORT_GPU_SHA256" ]]; then
    rm -f "$WHEEL_PATH"
    die "$WHEEL has sha256 $WHEEL_SHA, expected $ORT_GPU_SHA256 (deleted; run again)"
fi
log "$WHEEL: $WHEEL_SIZE bytes, sha256 $WHEEL_SHA"

# 2. The wheels the GPU image lacks.
rm -f "$DEPS_DIR"/*.whl "$DEPS_DIR/SHA256SUMS"
if [[ -n "$EXTRA_WHEELS" ]]; then
    # shellcheck disable=SC2086  # a space-separated list of requirements
    pip_download "$DEPS_DIR" $EXTRA_WHEELS
fi
(cd "$DEPS_DIR" && { sha256sum -- *.whl 2>/dev/null || true; } >SHA256SUMS)
deps_bytes=$(du -cb "$DEPS_DIR" | tail -1 | cut -f1)
log "deps: $(cd "$DEPS_DIR" && echo *.whl) ($deps_bytes bytes)"

# 3. How many parts: each call sends the tree + one part + the two small manifest files; the
#    deps travel alone in a first call (with them beside part 0, every part would have to
#    shrink to part 0's room: 8 calls instead of 6 with the ~30 MB of deps and a 2.7 MB tree).
tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | { xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
budget=$((LIMIT - tree_bytes - MARGIN - 64 * 1024))
(( tree_bytes + deps_bytes + MARGIN < LIMIT )) || die "the deps ($deps_bytes bytes) do not fit one call"
(( budget > 1024 * 1024 )) || die "the working tree ($tree_bytes bytes) leaves no room for a part"
need=$(( (WHEEL_SIZE + budget - 1) / budget ))
if (( need < MIN_PARTS )); then need=$MIN_PARTS; fi
if [[ -n "$PARTS" ]]; then
    (( PARTS >= need )) || die "--parts $PARTS: a part would be $((WHEEL_SIZE / PARTS)) bytes; \
beside a $tree_bytes-byte tree at most $budget fit in one call: use --parts $need or more"
else
    PARTS=$need
fi
log "working tree $tree_bytes bytes -> $PARTS parts of ~$((WHEEL_SIZE / PARTS)) bytes"

# 4. Split (again only when the wheel or the count changed) and write the manifest.
old_sha=$(sed -n 's/^WHEEL_SHA256=//p' "$PARTS_DIR/manifest.txt" 2>/dev/null || true)
old_parts=$(sed -n 's/^PARTS=//p' "$PARTS_DIR/manifest.txt" 2>/dev/null || true)
if (( FORCE )) || [[ "$old_sha" != "$WHEEL_SHA" || "$old_parts" != "$PARTS" ]]; then
    rm -f "$PARTS_DIR"/*.part-* "$PARTS_DIR/SHA256SUMS" "$PARTS_DIR/manifest.txt"
    width=${#PARTS}
    split -n "$PARTS" -d -a "$width" "$WHEEL_PATH" "$PARTS_DIR/$WHEEL.part-"
    (cd "$PARTS_DIR" && sha256sum -- "$WHEEL".part-* >SHA256SUMS)
    {
        echo "WHEEL=$WHEEL"
        echo "WHEEL_SHA256=$WHEEL_SHA"
        echo "WHEEL_SIZE=$WHEEL_SIZE"
        echo "PARTS=$PARTS"
    } >"$PARTS_DIR/manifest.txt"
fi

# 5. Prove the parts join back to the same bytes before anything travels.
joined_sha=$(cat "$PARTS_DIR/$WHEEL".part-* | sha256sum | cut -d' ' -f1)
[[ "$joined_sha" == "$WHEEL_SHA" ]] || die "parts join to sha256 $joined_sha, not $WHEEL_SHA"
for p in "$PARTS_DIR/$WHEEL".part-*; do
    s=$(size_of "$p")
    (( s + tree_bytes < LIMIT )) || die "$(basename "$p") ($s bytes) does not fit one call"
done

# 6. perf_analyzer for the device machine (run_gpu_checks.sh --only bench: the end-to-end
#    timings; --only cpubench: the CPU benchmark on its 16 cores): the relocatable build
#    bench/tools installs (binary, wrapper, Debian sysroot; ~36 MB), xz-packed to fit beside
#    the tree in one call.
PA_TAR="$WHL/perf_analyzer.tar.xz"
"$REPO/bench/tools/perf_analyzer" --version >/dev/null || die "perf_analyzer did not install"
tar -C "$REPO/.cache" -cJf "$PA_TAR" perf_analyzer/VERSION perf_analyzer/bin \
    perf_analyzer/libexec perf_analyzer/sysroot
pa_bytes=$(size_of "$PA_TAR")
(( tree_bytes + pa_bytes + MARGIN < LIMIT )) || die "perf_analyzer ($pa_bytes bytes) does not fit one call"
log "perf_analyzer packed: $pa_bytes bytes"

# 7. The plan: what each device call carries, and how much it sends.
{
    echo "# $(date -u +%FT%TZ): $WHEEL in $PARTS parts; working tree $tree_bytes bytes"
    echo "# call  bytes-sent  carry"
    # tritonclient's example programs, where this machine has them (scripts/run_triton_examples.py)
    examples=""
    if [[ -f .cache/triton-examples/simple_grpc_cudashm_client.py ]]; then
        examples=" .cache/triton-examples"
        deps_bytes=$((deps_bytes + $(du -cb .cache/triton-examples | tail -1 | cut -f1)))
    fi
    printf '%-5s %-11s %s\n' 1 "$((tree_bytes + deps_bytes))" \
        ".whl/parts/manifest.txt .whl/parts/SHA256SUMS .whl/deps$examples"
    i=1
    for p in "$PARTS_DIR/$WHEEL".part-*; do
        carry=".whl/parts/manifest.txt .whl/parts/SHA256SUMS .whl/parts/$(basename "$p")"
        bytes=$((tree_bytes + $(size_of "$p")))
        i=$((i + 1))
        printf '%-5s %-11s %s\n' "$i" "$bytes" "$carry"
    done
    echo "# commands (docs/gpu.md §10): calls 1..$i: bash scripts/gpu/install_on_device.sh"
    echo "# call $i adds: --require-complete && bash scripts/gpu/run_gpu_checks.sh --only tests"
    echo "# then one call each (same warm machine, each under 600 s); bench and cpubench carry"
    echo "# .whl/perf_analyzer.tar.xz ($((tree_bytes + pa_bytes)) bytes sent), examples nothing:"
    echo "#   bash scripts/gpu/install_on_device.sh --require-complete && bash scripts/gpu/run_gpu_checks.sh --only bench"
    echo "#   bash scripts/gpu/install_on_device.sh --require-complete && bash scripts/gpu/run_gpu_checks.sh --only examples"
    echo "#   bash scripts/gpu/install_on_device.sh --require-complete && bash scripts/gpu/run_gpu_checks.sh --only cpubench"
} >"$PARTS_DIR/PLAN.txt"
cat "$PARTS_DIR/PLAN.txt" >&2
log "ok: $PARTS parts in .whl/parts/ (joined sha256 verified), deps in .whl/deps/"
