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
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_models  # noqa: E402
import onnxruntime as ort  # noqa: E402
from e2e_grpc import E2EServer  # noqa: E402
from gpu_report import CUDA_SHM, RAW, E2ERun, Row, render, us  # noqa: E402
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
# perf_analyzer measures three fixed windows (stability check off, as in
# bench/observability_overhead.py): a bounded run per row, ~1.5 s at the default 400 ms window,
# so 3 models x 8 batches x 2 variants stay near 75 s.
PA_FIXED_WINDOWS = ("--stability-percentage", "1000", "--max-trials", "3")


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
    descriptions = {name: m.what for name, m in MODELS.items()}
    text = render(
        rows,
        info,
        args,
        cuda,
        e2e,
        e2e_error,
        not_captured,
        descriptions=descriptions,
        buckets=TABLE.sizes,
    )
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
