"""GPU benchmark of issue 4: the worker's compute time per batch with CUDA graphs on vs off.

    python bench/gpu_bench.py [--out PATH] [--json PATH] [--models dense,encoder,embedder]
                              [--batches 1-8] [--iters 300] [--warmup 30] [--device cuda|cpu]
                              [--no-e2e] [--no-perf-analyzer] [--pa-interval-ms 400]

Builds its models where it runs (bench/gpu_models.py: `dense` = the demo's 256->256->10 MLP,
`encoder` = 6 layers, hidden 384, 6 heads, sequence 128, on hidden states in and out;
`embedder` = the same layers behind token ids in and a mean-pooled [b, 384] out, shaped like
all-MiniLM-L6-v2), then for every batch size b (b requests of one row each, as the dynamic
batcher forms them) times, per batch:

  graphs on        GraphSet.run: gather into pinned staging, pad to the bucket, H2D into the
                   bound buffers, registry check, graph replay, D2H, trim and split (the
                   worker's path with graphs; buckets = the default table for max_batch_size 8)
  off: IOBinding   the same static-buffer IOBinding path without graphs: update_inplace,
                   run_with_iobinding with gpu_graph_id -1 on a session without graphs,
                   outputs to host (the fairest "off": only the graph differs)
  off: run()       GraphSet with graphs disabled: session.run on the concatenated rows
                   (what the worker runs for a model that cannot be captured)
  in-process       onnxruntime alone with IOBinding and graphs, exact batch size, no padding:
                   the reference the end-to-end criterion compares the server with

and writes a markdown table (to --out, default $OUT/gpu.md when $OUT is set, else
bench/results/gpu.md) naming the device, versions and command. `--device cpu` runs the same
code on the CPU EP (graph ids ignored) to check the script; its figures are not GPU figures.

Then (unless --no-e2e) it starts a real server on the same models (bench/e2e_grpc.py: CUDA
worker, graphs per bucket, `--allow-client-shm true`; `--device cpu` runs it with --cpu-graphs)
and times one ModelInfer of b rows at a time over gRPC on loopback (concurrency 1): the
end-to-end p50 the issue asks to be within 0.5 ms of the in-process column. Three clients:

  Python client    this process (bench/e2e_grpc.py), raw bytes; always run, and the figure
                   judged where perf_analyzer does not run (its own cost is in the figure)
  perf_analyzer    Triton's C++ load generator (bench/harness.py's PA and `perf`), raw bytes
                   in and out: the figure judged where `PA --version` runs
  perf_analyzer,   the same with `--shared-memory cuda`: input and output in CUDA memory the
  CUDA shm         server maps (GPU only; a failure leaves the column empty and is reported)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_models  # noqa: E402
import onnxruntime as ort  # noqa: E402
from e2e_grpc import E2EServer  # noqa: E402
from harness import PA, Proc, perf  # noqa: E402

from runtime.engine.buckets import BucketTable  # noqa: E402
from runtime.engine.graphs import GraphSet  # noqa: E402
from runtime.engine.session import (  # noqa: E402
    make_graph_session,
    make_session,
    preload_cuda_libraries,
    signature_of,
)
from runtime.ipc.pinning import cuda_available  # noqa: E402


class BenchModel(NamedTuple):
    """A benchmark model: its builder, INPUT0's row shape and element type, a description."""

    build: Callable[[], Any]
    row: tuple[int, ...]
    dtype: type[np.generic]
    what: str

    def inputs(self, rs: np.random.RandomState, n: int) -> np.ndarray:
        """`n` rows of INPUT0: normal floats, or token ids (any vocabulary of 1000 or more)."""
        if np.issubdtype(self.dtype, np.integer):
            return rs.randint(0, 1000, (n, *self.row)).astype(self.dtype)
        return rs.standard_normal((n, *self.row)).astype(self.dtype)


MODELS: dict[str, BenchModel] = {
    "dense": BenchModel(
        gpu_models.mlp, (256,), np.float32, "FP32 [b, 256] -> Gemm 256 + Relu -> Gemm 10"
    ),
    "encoder": BenchModel(
        gpu_models.encoder,
        (128, 384),
        np.float32,
        "FP32 [b, 128, 384] -> 6 x (MHA 6 heads + LayerNorm, FFN 1536 GELU + LayerNorm)",
    ),
    "embedder": BenchModel(
        gpu_models.embedder,
        (128,),
        np.int64,
        "INT64 token ids [b, 128] -> embeddings (30522 x 384) + LayerNorm -> the encoder's 6 "
        "layers -> mean pool -> FP32 [b, 384]",
    ),
}
TABLE = BucketTable.default(8)  # 1..8: what the worker uses for max_batch_size 8
E2E_LIMIT_US = 500.0  # the "within 0.5 ms of in-process"
# perf_analyzer measures three fixed windows (stability check off, as in
# bench/observability_overhead.py): a bounded run per row, ~1.5 s at the default 400 ms window,
# so 3 models x 8 batches x 2 variants stay near 75 s.
PA_FIXED_WINDOWS = ("--stability-percentage", "1000", "--max-trials", "3")
RAW, CUDA_SHM = "raw bytes", "CUDA shm"  # the perf_analyzer variants


@dataclass
class Row:
    model: str
    batch: int
    bucket: int
    graphs_on_us: float  # p50
    off_iobinding_us: float
    off_run_us: float
    in_process_us: float
    graphs_on_mean_us: float
    off_iobinding_mean_us: float
    # p50s of one gRPC ModelInfer of b rows through the server: the Python client's, then
    # perf_analyzer's with raw bytes in and out, and with input and output in CUDA shm
    e2e_us: float | None = None
    e2e_pa_us: float | None = None
    e2e_pa_cudashm_us: float | None = None
    # the server's own account (ModelStatistics) of the perf_analyzer runs, raw bytes and CUDA
    # shm: the mean per call of each phase, in microseconds
    pa_phases_us: dict[str, float] | None = None
    pa_cudashm_phases_us: dict[str, float] | None = None

    @property
    def cut_vs_iobinding(self) -> float:
        return 1.0 - self.graphs_on_us / self.off_iobinding_us

    @property
    def cut_vs_run(self) -> float:
        return 1.0 - self.graphs_on_us / self.off_run_us


def interleaved(fns: list[Callable[[], object]], warmup: int, iters: int) -> list[list[float]]:
    """Per-call wall times (microseconds) of each of `fns`, called in turn `iters` times after
    `warmup` rounds: a slow spell of the machine (a shared VM's neighbours) lands on every
    column alike instead of on whichever ran during it."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, times in zip(fns, out, strict=True):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


class StaticBinding:
    """onnxruntime alone: static buffers of exactly `batch` rows bound once to one IOBinding;
    `graph_id` None = no graph (gpu_graph_id -1), else that graph, captured on first use."""

    def __init__(
        self,
        sess: Any,
        row: tuple[int, ...],
        out_row: tuple[int, ...],
        batch: int,
        device: str,
        graph_id: int | None,
        dtype: type[np.generic] = np.float32,
    ) -> None:
        self.sess = sess
        self.x = ort.OrtValue.ortvalue_from_shape_and_type([batch, *row], dtype, device, 0)
        self.y = ort.OrtValue.ortvalue_from_shape_and_type([batch, *out_row], np.float32, device, 0)
        self.io = sess.io_binding()
        self.io.bind_ortvalue_input("INPUT0", self.x)
        self.io.bind_ortvalue_output("OUTPUT0", self.y)
        self.ro = ort.RunOptions()
        self.ro.add_run_config_entry("gpu_graph_id", "-1" if graph_id is None else str(graph_id))
        self.host = np.zeros((batch, *row), dtype=dtype)
        if graph_id is not None:  # warm up without a graph, then capture
            warm = ort.RunOptions()
            warm.add_run_config_entry("gpu_graph_id", "-1")
            for _ in range(2):
                sess.run_with_iobinding(self.io, warm)
            sess.run_with_iobinding(self.io, self.ro)

    def __call__(self, rows: list[np.ndarray]) -> np.ndarray:
        np.concatenate(rows, out=self.host)
        self.x.update_inplace(self.host)
        self.sess.run_with_iobinding(self.io, self.ro)
        out: np.ndarray = self.y.numpy()
        return out


class NotCaptured(Exception):
    """A model's graphs were not captured on this device (its reason is the message)."""


def bench_model(name: str, path: str, batches: list[int], args: argparse.Namespace) -> list[Row]:
    cuda = args.device == "cuda"
    dev_type = "cuda" if cuda else "cpu"
    if cuda:
        on = GraphSet.load(path, 0, TABLE, intra_op_threads=1)
        if not on.captured:
            on.close()
            raise NotCaptured(on.reason or "unknown")
        off = GraphSet.load(path, 0, TABLE, intra_op_threads=1, graphs=False)
        plain = make_session(path, "cuda:0", 1)
        graph_sess = make_graph_session(path, 0, 1)
    else:
        plain = make_session(path, "cpu", 1)
        graph_sess = make_session(path, "cpu", 1)
        on = GraphSet(plain, TABLE, signature_of(plain), device_type="cpu")
        on.capture()
        off = GraphSet(plain, TABLE, signature_of(plain), device_type="cpu", capturable=False)
    model = MODELS[name]
    row = model.row
    out_row = tuple(signature_of(plain).outputs[0].shape[1:])
    rs = np.random.RandomState(0)
    rows_out: list[Row] = []
    for b in batches:
        reqs = [model.inputs(rs, 1) for _ in range(b)]
        feeds = [{"INPUT0": r} for r in reqs]
        eager_io = StaticBinding(plain, row, out_row, b, dev_type, None, model.dtype)
        in_proc = StaticBinding(graph_sess, row, out_row, b, dev_type, b, model.dtype)  # id = b
        ref = on.run(feeds).outputs
        for got in (off.run(feeds).outputs, [[o] for o in np.split(in_proc(reqs), b)]):
            for (x,), (y,) in zip(ref, got, strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-2)
        t_on, t_io, t_run, t_in = interleaved(
            [
                lambda: on.run(feeds),  # noqa: B023 - called at once
                lambda: eager_io(reqs),  # noqa: B023
                lambda: off.run(feeds),  # noqa: B023
                lambda: in_proc(reqs),  # noqa: B023
            ],
            args.warmup,
            args.iters,
        )
        bucket = TABLE.bucket_for(b)
        assert bucket is not None
        rows_out.append(
            Row(
                name,
                b,
                bucket,
                statistics.median(t_on),
                statistics.median(t_io),
                statistics.median(t_run),
                statistics.median(t_in),
                statistics.fmean(t_on),
                statistics.fmean(t_io),
            )
        )
        print(
            f"{name} b={b}: on {rows_out[-1].graphs_on_us:.1f} us, off(io) "
            f"{rows_out[-1].off_iobinding_us:.1f} us, off(run) {rows_out[-1].off_run_us:.1f} "
            f"us, in-process {rows_out[-1].in_process_us:.1f} us",
            flush=True,
        )
    stats = on.stats().graphs
    print(f"{name}: replays {stats.replays}, eager {stats.eager}, mismatches {stats.mismatches}")
    return rows_out


@dataclass
class E2ERun:
    """What bench_e2e ran, for the report."""

    server_args: list[str]
    pa_version: str | None  # None: perf_analyzer does not run here, `pa_absent` says why
    pa_absent: str = ""
    commands: dict[str, str] = field(default_factory=dict)  # variant -> its first command
    errors: dict[str, list[str]] = field(default_factory=dict)  # variant -> "row: error"
    # perf_analyzer's p50 at concurrency 1 against bench/floor_server.py (dense, batch 1): the
    # gRPC floor of a Python grpc.aio server doing no work; None where it did not run
    floor_us: float | None = None
    # the same floor moving the encoder's largest batch (identity_fp32 echoing as many FP32
    # bytes in and out): what gRPC alone costs for that payload; None where it did not run
    payload_floor: tuple[Row, int, float] | None = None  # (that row, FP32 values each way, p50)


def first_line(text: str) -> str:
    lines = [t.strip() for t in text.strip().splitlines() if t.strip()]
    return lines[0][:300] if lines else ""


def perf_analyzer_version() -> tuple[str | None, str]:
    """perf_analyzer's version, or None and why it does not run here."""
    try:
        # Bounded: where .cache/perf_analyzer is missing, the wrapper tries to install it, which
        # needs the internet (run_gpu_checks.sh unpacks the carried archive instead).
        proc = subprocess.run(
            [str(PA), "--version"], capture_output=True, text=True, timeout=180, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"`{PA.name} --version` exited {proc.returncode}: {lines[-1] if lines else ''}"
    # It prints to stderr, and the wheel's binary calls itself "Version 0.0.0 (commit ...)":
    # the installer's VERSION file names the release.
    version = first_line(proc.stderr or proc.stdout)
    installed = ROOT / ".cache" / "perf_analyzer" / "VERSION"  # written by its installer
    if installed.exists():
        version += f"; {first_line(installed.read_text())}"
    return version, ""


def pa_p50(
    run: E2ERun, variant: str, r: Row, port: int, interval_ms: int, extra: tuple[str, ...]
) -> float | None:
    """perf_analyzer's p50 (us) for one ModelInfer of `r.batch` rows at concurrency 1, or None
    with the reason kept in `run.errors`."""
    try:
        res, cmd = perf(r.model, port, 1, interval_ms, None, (*PA_FIXED_WINDOWS, *extra), r.batch)
    except Exception as exc:  # whatever went wrong, the row stays empty and the report says why
        run.errors.setdefault(variant, []).append(f"{r.model} b={r.batch}: {first_line(str(exc))}")
        return None
    run.commands.setdefault(variant, cmd)
    return res["p50 latency"]


def bench_e2e(rows: list[Row], paths: dict[str, Path], args: argparse.Namespace) -> E2ERun:
    """Fill the end-to-end columns of every row through one real server: the Python client's
    always, perf_analyzer's where it runs (its CUDA shm variant on a GPU only)."""
    models = {}
    refs = {}  # what each end-to-end answer is checked against (CPU EP, no thread pool)
    for name, path in paths.items():
        refs[name] = make_session(str(path), "cpu", 1)
        sig = signature_of(refs[name])
        model = MODELS[name]
        models[name] = (path, model.row, tuple(sig.outputs[0].shape[1:]), model.dtype)
    cuda = args.device == "cuda"
    if args.no_perf_analyzer:
        version, absent = None, "--no-perf-analyzer"
    else:
        version, absent = perf_analyzer_version()
    rs = np.random.RandomState(1)
    # The CUDA shm variant registers regions, which a server takes only with this flag; the
    # raw-bytes paths never use it, and the CPU dry run starts the same server as the GPU run.
    shm_on = ["--allow-client-shm", "true"]
    with E2EServer(models, "cuda:0" if cuda else "cpu", extra_args=shm_on) as srv:
        run = E2ERun(srv.args, version, absent)
        for r in rows:
            out_row = models[r.model][2]
            x = MODELS[r.model].inputs(rs, r.batch)
            t, y = srv.time(r.model, x, args.warmup, args.iters)  # also warms this batch size
            want = refs[r.model].run(None, {"INPUT0": x})[0]
            np.testing.assert_allclose(y, want, rtol=2e-2, atol=2e-2)
            r.e2e_us = statistics.median(t)
            if version is not None:
                before = srv.phase_totals(r.model)
                r.e2e_pa_us = pa_p50(run, RAW, r, srv.port, args.pa_interval_ms, ())
                r.pa_phases_us = phase_means(before, srv.phase_totals(r.model))
            if version is not None and cuda:
                # perf_analyzer sizes a fixed-shape output from the model's config; the flag
                # states the batch's output bytes, the most it may need.
                out_bytes = r.batch * math.prod(out_row) * 4
                shm = ("--shared-memory", "cuda", "--output-shared-memory-size", str(out_bytes))
                before = srv.phase_totals(r.model)
                r.e2e_pa_cudashm_us = pa_p50(run, CUDA_SHM, r, srv.port, args.pa_interval_ms, shm)
                r.pa_cudashm_phases_us = phase_means(before, srv.phase_totals(r.model))
            print(
                f"{r.model} b={r.batch}: end-to-end p50 {us(r.e2e_us)} us Python client, "
                f"{us(r.e2e_pa_us)} us perf_analyzer, {us(r.e2e_pa_cudashm_us)} us CUDA shm "
                f"(in-process {r.in_process_us:.1f} us)",
                flush=True,
            )
    if version is not None:
        run.floor_us = floor_p50(run, args.pa_interval_ms, "dense", None)
        print(f"gRPC floor (bench/floor_server.py, dense b=1): {us(run.floor_us)} us", flush=True)
        big = max((r for r in rows if r.model == "encoder"), key=lambda r: r.batch, default=None)
        if big is not None:
            floats = big.batch * math.prod(MODELS["encoder"].row)
            p50 = floor_p50(run, args.pa_interval_ms, "identity_fp32", f"INPUT0:{floats}")
            print(f"gRPC floor, encoder b={big.batch}'s payload: {us(p50)} us", flush=True)
            if p50 is not None:
                run.payload_floor = (big, floats, p50)
    return run


def phase_means(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float] | None:
    """Each phase's mean (us) over the calls between two `phase_totals` snapshots."""
    means = {}
    for phase, (ns, n) in after.items():
        ns0, n0 = before.get(phase, (0, 0))
        if n > n0:
            means[phase] = (ns - ns0) / (n - n0) / 1000
    return means or None


def floor_p50(run: E2ERun, interval_ms: int, model: str, shape: str | None) -> float | None:
    """perf_analyzer's p50 at concurrency 1 for `model` (b=1, or `shape`) against the no-work
    grpc.aio server (bench/floor_server.py), run after microtune's server has stopped: how
    much of the end-to-end figure any Python gRPC server pays before doing anything."""
    server = Proc(
        [sys.executable, "bench/floor_server.py", "--model", model, "--port", "0"], "floor"
    )
    what = f"{model} {shape or 'b=1'}"
    try:
        port = server.wait(ready_check=False)  # no health service: its port file means it serves
        res, cmd = perf(model, port, 1, interval_ms, shape, PA_FIXED_WINDOWS, 1)
    except Exception as exc:
        run.errors.setdefault("floor", []).append(f"{what}: {first_line(str(exc))}")
        return None
    finally:
        server.stop()
    run.commands[f"floor {model}"] = cmd
    return res["p50 latency"]


def describe_device(cuda: bool) -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "onnxruntime": f"{ort.__version__} ({Path(ort.__file__).parent})",
        "providers": ", ".join(ort.get_available_providers()),
        "host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
    }
    if not cuda:
        info["device"] = f"CPU EP dry run on {platform.processor() or platform.machine()}"
        return info
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        info["device"] = smi.stdout.strip().splitlines()[0]
    except Exception as exc:
        info["device"] = f"unknown (nvidia-smi: {exc})"
    try:
        import cupy

        rt = cupy.cuda.runtime
        name = rt.getDeviceProperties(0)["name"]
        info["device 0 (cupy)"] = name.decode() if isinstance(name, bytes) else str(name)
        versions = f"CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}"
        info["cupy"] = f"{cupy.__version__}, {versions}"
    except Exception as exc:
        info["cupy"] = f"unavailable ({exc})"
    return info


def render(
    rows: list[Row],
    info: dict[str, str],
    args: argparse.Namespace,
    cuda: bool,
    e2e: E2ERun | None,
    e2e_error: str | None = None,
    not_captured: dict[str, str] | None = None,
) -> str:
    cmd = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    lines = [
        "# GPU benchmark: CUDA graphs per batch bucket (issue 4)",
        "",
    ]
    if not cuda:
        lines += ["**CPU dry run of the script (`--device cpu`): these are NOT GPU figures.**", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- command: `{cmd}` (run by scripts/gpu/run_gpu_checks.sh on the GPU machine)",
        f"- buckets: {' '.join(map(str, TABLE.sizes))} (default table for max_batch_size 8); "
        f"a batch of b requests of one row each; {args.iters} timed batches after "
        f"{args.warmup} warm-up rounds, the four columns called in turn in each round (a slow "
        "spell of the machine hits them alike); p50 in microseconds of wall time on the "
        "calling thread",
        "",
        "Worker compute time per batch = gather + pad + H2D + run + D2H + split. "
        "`cut` = 1 - graphs on / graphs off.",
        "",
    ]
    for model, why in (not_captured or {}).items():
        lines += [
            f"## {model}: {MODELS[model].what}",
            "",
            f"**Not measured: its graphs were not captured on this device** ({why}). The worker "
            "would serve it on the counted eager path.",
            "",
        ]
    for model in dict.fromkeys(r.model for r in rows):
        what = MODELS[model].what
        lines += [
            f"## {model}: {what}",
            "",
            "| batch | bucket | graphs on | off: IOBinding | cut | off: run() | cut "
            "| in-process ORT IOBinding+graphs |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        sel = [r for r in rows if r.model == model]
        for r in sel:
            lines.append(
                f"| {r.batch} | {r.bucket} | {r.graphs_on_us:.1f} | {r.off_iobinding_us:.1f} | "
                f"{r.cut_vs_iobinding:+.0%} | {r.off_run_us:.1f} | {r.cut_vs_run:+.0%} | "
                f"{r.in_process_us:.1f} |"
            )
        worst = min(r.cut_vs_iobinding for r in sel)
        worst_run = min(r.cut_vs_run for r in sel)
        verdict = "PASS" if worst >= 0.30 else "FAIL"
        verdict_run = "PASS" if worst_run >= 0.30 else "FAIL"
        if not cuda:
            verdict = verdict_run = "not applicable (CPU dry run)"
        failing = [str(r.batch) for r in sel if r.cut_vs_iobinding < 0.30]
        lines += [
            "",
            'Criterion "graphs on cut compute time per batch by >= 30% against graphs off, '
            'batch 1-8":',
            f"- against the worker's own path with graphs off (`off: run()`, what the worker "
            f"runs for a version without graphs): smallest cut {worst_run:+.0%}: "
            f"**{verdict_run}**;",
            f"- against a bare IOBinding loop without a graph (`off: IOBinding`: exact batch, "
            f"no padding, no batch assembly; the stricter one): smallest cut {worst:+.0%}: "
            f"**{verdict}**"
            + (f" (under 30% at batch {', '.join(failing)})." if failing and cuda else "."),
            "",
        ]
    lines += render_e2e(rows, e2e, cuda, e2e_error)
    return "\n".join(lines)


def us(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def column_verdict(rows: list[Row], values: list[float | None], cuda: bool) -> str:
    """Largest difference to in-process, the rows over 0.5 ms or unmeasured, and the verdict
    of one end-to-end column."""
    diffs = [(r, v - r.in_process_us) for r, v in zip(rows, values, strict=True) if v is not None]
    over = [f"{r.model} b={r.batch}" for r, d in diffs if d > E2E_LIMIT_US]
    missing = [f"{r.model} b={r.batch}" for r, v in zip(rows, values, strict=True) if v is None]
    if not diffs:
        return "not measured: **FAIL**" if cuda else "not measured"
    notes = [f"over 0.5 ms: {', '.join(over)}"] if over else []
    if missing:
        notes.append(f"not measured: {', '.join(missing)}")
    verdict = "FAIL" if over or missing else "PASS"
    if not cuda:
        verdict = "not applicable (CPU dry run)"
    text = f"largest difference {max(d for _, d in diffs):+.1f} us"
    if notes:
        text += f" ({'; '.join(notes)})"
    return f"{text}: **{verdict}**"


def render_e2e(
    rows: list[Row], run: E2ERun | None, cuda: bool, error: str | None = None
) -> list[str]:
    if run is None and error is None:
        return ["## End-to-end p50 over gRPC at concurrency 1: not run (--no-e2e)", ""]
    server = f"`python -m server serve {shlex.join(run.server_args)}`" if run else "A server"
    have_pa = run is not None and run.pa_version is not None
    lines = [
        "## End-to-end p50 over gRPC at concurrency 1",
        "",
        f"{server} on these models (max_batch_size 8, no queue delay). Each end-to-end column "
        "is the p50 of one ModelInfer of b rows at a time over loopback, from:",
        "",
        "- **Python client**: this process, request serialized once, a generic unary call, raw "
        "bytes in and out; the Python grpc channel's own cost per call is inside the figure.",
    ]
    if run is not None and run.pa_version is not None:
        lines += [
            f"- **perf_analyzer** ({run.pa_version}), Triton's C++ load generator, raw bytes in "
            "and out, random input; three fixed windows of `--measurement-interval` ms (no "
            "stability search), p50 of the merged windows; per row its model and `-b` its "
            "batch: "
            f"`{run.commands.get(RAW, 'no run succeeded')}`",
            "- **perf_analyzer, CUDA shm**: the same with input and output in cudaMalloc'd "
            "memory registered once through the CUDA shared-memory extension (the request "
            "names the regions; no tensor bytes on the wire), what a client whose big tensors "
            "are on the GPU sends; `--output-shared-memory-size` = the batch's output bytes: "
            + (
                f"`{run.commands.get(CUDA_SHM, 'no run succeeded')}`"
                if cuda
                else "not applicable on the CPU dry run (no CUDA device)."
            ),
        ]
    elif run is not None:
        lines.append(f"- **perf_analyzer**: not run here ({run.pa_absent}).")
    lines += [
        "",
        "In-process = onnxruntime alone with IOBinding and a graph of exactly b rows (the "
        "column above). Differences are to in-process, in microseconds.",
        "",
        "| model | batch | in-process | Python client | diff | perf_analyzer | diff "
        "| perf_analyzer CUDA shm | diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r.model, str(r.batch), f"{r.in_process_us:.1f}"]
        for v in (r.e2e_us, r.e2e_pa_us, r.e2e_pa_cudashm_us):
            cells += [us(v), "—" if v is None else f"{v - r.in_process_us:+.1f}"]
        lines.append(f"| {' | '.join(cells)} |")
    python = column_verdict(rows, [r.e2e_us for r in rows], cuda)
    judged = "perf_analyzer (raw bytes)" if have_pa else "Python client"
    lines += [
        "",
        f'Criterion "end-to-end p50 at concurrency 1 within 0.5 ms of in-process onnxruntime '
        f'with IOBinding and graphs", judged on the {judged} column: '
        + (column_verdict(rows, [r.e2e_pa_us for r in rows], cuda) if have_pa else python)
        + ".",
        "",
    ]
    if have_pa and cuda:
        shm = column_verdict(rows, [r.e2e_pa_cudashm_us for r in rows], cuda)
        lines.append(f"- the same on the perf_analyzer CUDA shm column: {shm}.")
    elif have_pa:
        lines.append("- the perf_analyzer CUDA shm column: not applicable (CPU dry run).")
    elif run is not None:
        lines.append("- perf_analyzer columns: not measured (perf_analyzer does not run here).")
    if have_pa:
        lines.append(f"- the Python client column, client cost included, for reference: {python}.")
    lines.append("")
    lines += render_phases(rows, RAW) + render_phases(rows, CUDA_SHM)
    if run is not None:
        lines += render_floors(rows, run)
    for variant, errs in (run.errors if run else {}).items():
        lines += [
            f"perf_analyzer ({variant}) failed on {len(errs)} of {len(rows)} rows; first: "
            f"`{errs[0]}`",
            "",
        ]
    if error is not None:
        lines += [f"The end-to-end run stopped: `{error}` (the log has the traceback).", ""]
    return lines


def render_phases(rows: list[Row], variant: str) -> list[str]:
    """The server's own account of each perf_analyzer row of `variant`: where its time went."""
    cuda_shm = variant == CUDA_SHM
    measured = [(r, r.pa_cudashm_phases_us if cuda_shm else r.pa_phases_us) for r in rows]
    measured = [(r, p) for r, p in measured if p]
    if not measured:
        return []
    lines = [
        f"The server's own account of the perf_analyzer {variant} calls (ModelStatistics, mean "
        "per call in microseconds; the run's warm-up calls included). `success` runs from the "
        "front's handler taking the request to its answer; queue (the worker's read to the "
        "batch's start), input (gather and host-to-device), infer (the replay) and output "
        "(device-to-host and the arena) are the worker's; `rest` = success minus those four: "
        "the front's code and the link's two wake-ups. Outside `success`: both gRPC stacks "
        "(see the floor below).",
        "",
        "| model | batch | perf_analyzer p50 | success | queue | input | infer | output | rest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, p in measured:
        worker = [p.get(k) for k in ("queue", "compute_input", "compute_infer", "compute_output")]
        success = p.get("success")
        known = [w for w in worker if w is not None]
        rest = success - sum(known) if success is not None and len(known) == 4 else None
        p50 = r.e2e_pa_cudashm_us if cuda_shm else r.e2e_pa_us
        cells = [r.model, str(r.batch), us(p50), us(success), *map(us, worker), us(rest)]
        lines.append(f"| {' | '.join(cells)} |")
    return [*lines, ""]


def render_floor(what: str, row: Row | None, floor_us: float, cmd: str) -> str:
    """A gRPC floor (`what` it moved) and how far microtune's `row` is above it."""
    text = (
        f"gRPC floor, {what}: perf_analyzer at concurrency 1 against bench/floor_server.py (a "
        f"grpc.aio server that parses ModelInfer and answers it with a prebuilt or echoed "
        f"response: no worker, no compute): **{floor_us:.1f} us** p50 (`{cmd}`)."
    )
    if row is not None and row.e2e_pa_us is not None:
        above = row.e2e_pa_us - floor_us
        text += (
            f" microtune's {row.model} b={row.batch} (raw bytes) is {above:+.1f} us above it, "
            f"of which {row.in_process_us:.1f} us is the in-process replay; the rest "
            f"({above - row.in_process_us:+.1f} us) is the server's own path (front, worker "
            f"link, batcher, copies)."
        )
    return text


def render_floors(rows: list[Row], run: E2ERun) -> list[str]:
    """The dense b=1 floor, and the encoder's largest payload's, each beside microtune's row."""
    lines = []
    if run.floor_us is not None:
        dense = next((r for r in rows if r.model == "dense" and r.batch == 1), None)
        cmd = run.commands["floor dense"]
        lines += [render_floor("dense b=1", dense, run.floor_us, cmd), ""]
    if run.payload_floor is not None:
        big, floats, floor_us = run.payload_floor
        what = (
            f"the encoder b={big.batch}'s payload (identity_fp32 echoing "
            f"{floats * 4 / (1 << 20):.2f} MiB of FP32 in and out)"
        )
        text = render_floor(what, big, floor_us, run.commands["floor identity_fp32"])
        if floor_us >= E2E_LIMIT_US:
            text += (
                " The floor alone is over 0.5 ms: raw bytes of this size cannot come within "
                "0.5 ms of in-process through a Python gRPC server; the CUDA shm column carries "
                "no tensor bytes."
            )
        lines += [text, ""]
    return lines


def parse_batches(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default_out = (
        Path(os.environ["OUT"]) / "gpu.md"
        if os.environ.get("OUT")
        else (ROOT / "bench" / "results" / "gpu.md")
    )
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument("--json", type=Path, default=None, help="also write the raw rows as JSON")
    p.add_argument("--models", default="dense,encoder,embedder")
    p.add_argument("--batches", default="1-8")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end gRPC timings")
    p.add_argument(
        "--no-perf-analyzer",
        action="store_true",
        help="end to end with the Python client only (where perf_analyzer cannot run)",
    )
    p.add_argument(
        "--pa-interval-ms",
        type=int,
        default=400,
        help="perf_analyzer's measurement window; each run measures three",
    )
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        preload_cuda_libraries()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(
                f"onnxruntime {ort.__version__} has no CUDA EP: install onnxruntime-gpu"
            )
        if not cuda_available():
            raise SystemExit("cupy is missing or sees no CUDA device (pinned staging needs it)")
    batches = parse_batches(args.batches)
    if max(batches) > TABLE.sizes[-1]:
        raise SystemExit(f"batches above {TABLE.sizes[-1]} have no bucket")
    info = describe_device(cuda)
    rows: list[Row] = []
    e2e: E2ERun | None = None
    e2e_error: str | None = None
    not_captured: dict[str, str] = {}  # model -> why (the other models are still measured)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        paths: dict[str, Path] = {}
        for name in args.models.split(","):
            path = gpu_models.save(MODELS[name].build(), Path(tmp) / f"{name}.onnx")
            try:
                rows += bench_model(name, str(path), batches, args)
            except NotCaptured as exc:
                not_captured[name] = str(exc)
                print(f"{name}: graphs were not captured: {exc}", flush=True)
                continue
            paths[name] = path
        if not args.no_e2e:
            try:
                e2e = bench_e2e(rows, paths, args)
            except Exception as exc:  # keep the kernel figures: they are written regardless
                traceback.print_exc()
                msg = str(exc).strip().splitlines()
                e2e_error = f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"
    text = render(rows, info, args, cuda, e2e, e2e_error, not_captured)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if args.json:
        floors: dict[str, Any] = {}
        if e2e is not None:
            floors["dense b=1"] = e2e.floor_us
            if e2e.payload_floor is not None:
                big, _, p50 = e2e.payload_floor
                floors[f"encoder b={big.batch} payload"] = p50
        report = {"info": info, "rows": [asdict(r) for r in rows], "grpc_floor_us": floors}
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if e2e_error is not None or not_captured else 0


if __name__ == "__main__":
    sys.exit(main())
