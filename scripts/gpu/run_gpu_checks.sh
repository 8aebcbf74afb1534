#!/usr/bin/env bash
# Runs ON THE GPU MACHINE after scripts/gpu/install_on_device.sh: the GPU tests and the GPU
# benchmark, with onnxruntime-gpu from $SITE ahead of the image's CPU onnxruntime.
#
# Writes into $OUT (the device tool's result folder; else bench/results/):
#   gpu-env.txt      device, driver, versions, library paths
#   gpu-tests.log    pytest -m gpu tests/gpu (MICROTUNE_REQUIRE_GPU=1: no silent skips), then
#                    tests/integration/test_fuzz.py against a CUDA worker (MICROTUNE_FUZZ_DEVICE)
#   gpu.md, gpu.json the benchmark table (bench/gpu_bench.py) and its raw rows; its end-to-end
#                    section runs perf_analyzer where .whl/perf_analyzer.tar.xz travelled
#   gpu-bench.log    the benchmark's output
#   gpu-examples.log tritonclient's simple_grpc_cudashm_client.py (and the system shm examples),
#                    unchanged, against a server on the demo repository (CUDA worker); only
#                    where the examples travelled (.cache/triton-examples, see
#                    fetch_ort_gpu_wheel.sh), with cuda-python from the carried wheels
#   fast-runtime-16core.md, cpu-bench.log   (--only cpubench) bench/fast_runtime.py on this
#                    machine's CPUs, CPU worker (MICROTUNE_DEVICE=cpu), perf_analyzer unpacked
#                    from the carried .whl/perf_analyzer.tar.xz (fetch_ort_gpu_wheel.sh)
# Runs every step even when one fails; exits non-zero if any failed. `--only` picks steps, so
# that each fits one device call's 10 minutes (docs/gpu.md §10: tests, bench, examples).
#
# Usage: bash scripts/gpu/run_gpu_checks.sh [--only tests,bench,examples,cpubench] [gpu_bench.py args]
# (without --only: tests, bench, examples)
# Env:   SITE (/tmp/site), PYTHON (python3), OUT, PYTEST_ARGS
set -uo pipefail

STEPS="tests,bench,examples"
if [[ "${1:-}" == "--only" ]]; then
    STEPS="${2:?--only needs a comma-separated list of tests, bench, examples, cpubench}"
    shift 2
fi
for s in ${STEPS//,/ }; do
    case "$s" in tests|bench|examples|cpubench) ;; *) echo "run_gpu_checks: unknown step: $s" >&2; exit 2 ;; esac
done
want() { [[ ",$STEPS," == *",$1,"* ]]; }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
SITE="${SITE:-/tmp/site}"
PYTHON="${PYTHON:-python3}"
RESULTS="${OUT:-$REPO/bench/results}"
mkdir -p "$RESULTS"
cd "$REPO"

log() { echo "run_gpu_checks: $*" >&2; }

[[ -d "$SITE/onnxruntime" ]] || { log "no onnxruntime in $SITE: run install_on_device.sh first"; exit 1; }

# onnxruntime-gpu in $SITE finds its CUDA 13 / cuDNN 9 libraries neither beside itself nor by
# RUNPATH: point the loader at the nvidia/*/lib folders of the image's Python (torch's CUDA).
NVIDIA_LIBS=$("$PYTHON" - <<'EOF'
import glob, os, site
dirs = []
for sp in [*site.getsitepackages(), site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
print(":".join(d for d in dirs if os.path.isdir(d)))
EOF
)
export LD_LIBRARY_PATH="${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$SITE:$REPO"
export MICROTUNE_REQUIRE_GPU=1 PYTHONUNBUFFERED=1

# Every server started here reserves a 64 MiB arena per front in /dev/shm (4 fronts on 16 CPUs)
# and exits with code 78 where they do not fit. A container's /dev/shm may be Docker's 64 MiB:
# grow it when we may (root), else run one front, with a smaller arena if need be.
shm_free_mib() { df -Pm /dev/shm | awk 'NR==2 {print $4}'; }
SHM_NOTE="/dev/shm: $(shm_free_mib) MiB free"
if (( $(shm_free_mib) < 320 )); then
    if mount -o remount,size=2g /dev/shm 2>/dev/null; then
        SHM_NOTE="$SHM_NOTE; remounted with size=2g: $(shm_free_mib) MiB free"
    else
        export MICROTUNE_FRONTENDS=1
        if (( $(shm_free_mib) < 96 )); then export MICROTUNE_SHM_SLOTS=256; fi
        SHM_NOTE="$SHM_NOTE; could not grow it: MICROTUNE_FRONTENDS=1 MICROTUNE_SHM_SLOTS=${MICROTUNE_SHM_SLOTS:-1024}"
    fi
fi
log "$SHM_NOTE"

{
    echo "# $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    echo "python: $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "$SHM_NOTE"
    "$PYTHON" - <<'EOF' 2>&1
import onnxruntime as ort
print(f"onnxruntime {ort.__version__} {ort.__file__}")
print(f"available providers {ort.get_available_providers()}")
try:
    from onnxruntime.capi import build_and_package_info as b
    print(f"package {b.package_name} cuda {getattr(b, 'cuda_version', '?')}")
except Exception as exc:
    print(f"build info: {exc}")
import cupy
print(f"cupy {cupy.__version__}; runtime {cupy.cuda.runtime.runtimeGetVersion()}; "
      f"driver {cupy.cuda.runtime.driverGetVersion()}; "
      f"device 0 {cupy.cuda.runtime.getDeviceProperties(0)['name']}")
EOF
} | tee "$RESULTS/gpu-env.txt"

rc_tests=0
if want tests; then
    log "pytest -m gpu tests/gpu"
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of flags
    "$PYTHON" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
        | tee "$RESULTS/gpu-tests.log"
    rc_tests=${PIPESTATUS[0]}
    # Odd requests, shared-memory parameters and CUDA IPC handles against a CUDA worker (graphs
    # per bucket, the pinned arena): every answer a result or a client error, no restart.
    log "pytest tests/integration/test_fuzz.py (MICROTUNE_FUZZ_DEVICE=cuda:0)"
    # shellcheck disable=SC2086
    MICROTUNE_FUZZ_DEVICE=cuda:0 "$PYTHON" -m pytest tests/integration/test_fuzz.py -q -rs \
        -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee -a "$RESULTS/gpu-tests.log"
    (( PIPESTATUS[0] == 0 )) || rc_tests=1
fi

# perf_analyzer (bench/tools/perf_analyzer runs .cache/perf_analyzer/bin/perf_analyzer, and
# would try to install it from the internet where that does not run): unpack the carried
# .whl/perf_analyzer.tar.xz (fetch_ort_gpu_wheel.sh makes it). Its wrapper runs it through the
# archive's own loader and library path, which replace LD_LIBRARY_PATH, so for
# `--shared-memory cuda` the libcudart.so it dlopens is linked into that library folder from
# the image's CUDA runtime (torch's nvidia/*/lib, where pip ships libcudart.so.N only).
PA_HOME="$REPO/.cache/perf_analyzer"
pa_works() { "$PA_HOME/bin/perf_analyzer" --version >/dev/null 2>&1; }
unpack_perf_analyzer() {
    local tar="$REPO/.whl/perf_analyzer.tar.xz" lib="$PA_HOME/sysroot/usr/lib/x86_64-linux-gnu" d f
    if ! pa_works && [[ -f "$tar" ]]; then
        mkdir -p "$REPO/.cache" && tar -C "$REPO/.cache" -xJf "$tar"
    fi
    pa_works || return 1
    [[ -e "$lib/libcudart.so" ]] && return 0
    for d in ${NVIDIA_LIBS//:/ }; do
        for f in "$d"/libcudart.so.*; do
            if [[ -e "$f" ]]; then ln -sfn "$f" "$lib/libcudart.so"; return 0; fi
        done
    done
    log "no libcudart.so.* under the image's nvidia/*/lib: perf_analyzer's CUDA shm runs will fail"
}

rc_bench=0
if want bench; then
    no_pa=""
    if ! unpack_perf_analyzer; then
        log "no perf_analyzer (carry .whl/perf_analyzer.tar.xz): end to end with the Python client only"
        no_pa="--no-perf-analyzer"
    fi
    log "bench/gpu_bench.py $no_pa $*"
    "$PYTHON" bench/gpu_bench.py --out "$RESULTS/gpu.md" --json "$RESULTS/gpu.json" \
        ${no_pa:+"$no_pa"} "$@" 2>&1 | tee "$RESULTS/gpu-bench.log"
    rc_bench=${PIPESTATUS[0]}
fi

# tritonclient's example programs against a whole server (the CUDA one needs a GPU client).
EXAMPLES="${EXAMPLES:-$REPO/.cache/triton-examples}"
[[ -f "$EXAMPLES/simple_grpc_cudashm_client.py" ]] || EXAMPLES="${STASH:-/tmp/microtune-ort-gpu}/examples"
rc_examples=0
if ! want examples; then
    :
elif [[ -f "$EXAMPLES/simple_grpc_cudashm_client.py" ]]; then
    log "tritonclient examples from $EXAMPLES"
    work=$(mktemp -d)
    "$PYTHON" -m server serve --model-repository server/demo_repository --grpc-port 0 \
        --metrics-port -1 --allow-client-shm true --port-file "$work/port" >"$work/server.log" 2>&1 &
    server_pid=$!
    if "$PYTHON" scripts/gpu/wait_model_ready.py "$work/port" simple 300 \
        2>&1 | tee "$RESULTS/gpu-examples.log"; then
        "$PYTHON" scripts/run_triton_examples.py --examples-dir "$EXAMPLES" --strict \
            --url "127.0.0.1:$(cat "$work/port")" --show-output all \
            simple_grpc_cudashm_client simple_grpc_shm_client simple_grpc_shm_string_client \
            2>&1 | tee -a "$RESULTS/gpu-examples.log"
        rc_examples=${PIPESTATUS[0]}
    else
        rc_examples=1
    fi
    kill "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
    { echo "--- server log (tail)"; tail -n 60 "$work/server.log"; } >>"$RESULTS/gpu-examples.log"
    rm -rf "$work"
else
    log "no tritonclient examples here (.cache/triton-examples): skipped"
fi

# The CPU half of the fast-runtime benchmark where cores are not the limit (the development
# machine has 2, shared by perf_analyzer, the fronts and the worker).
rc_cpu=0
if want cpubench; then
    if unpack_perf_analyzer; then
        log "bench/fast_runtime.py on $(nproc) CPUs (CPU worker)"
        MICROTUNE_DEVICE=cpu "$PYTHON" bench/fast_runtime.py \
            --out "$RESULTS/fast-runtime-16core.md" 2>&1 | tee "$RESULTS/cpu-bench.log"
        rc_cpu=${PIPESTATUS[0]}
    else
        log "no perf_analyzer: carry .whl/perf_analyzer.tar.xz (fetch_ort_gpu_wheel.sh makes it)"
        rc_cpu=1
    fi
fi

log "tests exit $rc_tests, benchmark exit $rc_bench, examples exit $rc_examples, cpu benchmark exit $rc_cpu; results in $RESULTS"
(( rc_tests == 0 && rc_bench == 0 && rc_examples == 0 && rc_cpu == 0 ))
