"""The report of bench/gpu_bench.py: its rows, and the markdown it writes from them (the compute
table per model with the ">= 30% cut" verdicts, the end-to-end table with the "within 0.5 ms"
verdicts, the server's own account of the perf_analyzer calls, the gRPC floors).

Pure functions of the measured rows: no device, no server, no onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
E2E_LIMIT_US = 500.0  # the "within 0.5 ms of in-process"
RAW, CUDA_SHM = "raw bytes", "CUDA shm"  # the perf_analyzer variants


@dataclass
class Row:
    """One model at one batch size: compute per batch (graphs on and off, in-process), then the
    end-to-end figures and the server's own account, filled in by the end-to-end run."""

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


def render(
    rows: list[Row],
    info: dict[str, str],
    args: argparse.Namespace,
    cuda: bool,
    e2e: E2ERun | None,
    e2e_error: str | None = None,
    not_captured: dict[str, str] | None = None,
    *,
    descriptions: Mapping[str, str],
    buckets: Sequence[int],
) -> str:
    """The markdown report: the device, the compute table per model (`descriptions`: each one's),
    the end-to-end table, the server's own account and the gRPC floors."""
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
        f"- buckets: {' '.join(map(str, buckets))} (default table for max_batch_size 8); "
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
            f"## {model}: {descriptions[model]}",
            "",
            f"**Not measured: its graphs were not captured on this device** ({why}). The worker "
            "would serve it on the counted eager path.",
            "",
        ]
    for model in dict.fromkeys(r.model for r in rows):
        what = descriptions[model]
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
