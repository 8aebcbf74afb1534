"""The fast-runtime benchmark (CPU machine), one command, one run, driven by perf_analyzer:

    python bench/fast_runtime.py [--out bench/results/fast-runtime.md]

1. dynamic batching: `dense_large` at concurrency 16, batching on (its config: max queue delay
   2 ms) vs `--dynamic-batching false`;
2. client shared memory: `identity_fp32` with a 4 MiB FP32 input and output at concurrency 4,
   through system shared memory (`--shared-memory system`) vs raw gRPC bytes;
3. front processes: `simple` at concurrency 32, `--frontends 2` vs `--frontends 1`;
4. `dense` at concurrency 16 vs the no-work floor server (bench/floor_server.py).
Writes a markdown table with the commands and the issue's acceptance checks.

The two comparisons of two servers on the same load (3 and 4) run in `--rounds` rounds
(default 3), their order alternating (A B, B A, A B...): on a shared 2-core machine throughput
drifts by +-15 % over a minute, which a single A-then-B pair reads as a difference between
servers. Their check takes the median of the rounds' ratios; the table shows each run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, Proc, Row, measure

REPO = ROOT / "server" / "demo_repository"
MIB4 = 4 * 1024 * 1024


def microtune(*flags: str, name: str = "microtune") -> Proc:
    return Proc(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            "--log-level",
            "WARNING",
            "--model-repository",
            str(REPO),
            *flags,
        ],
        name,
    )


def run_one(
    server: Proc,
    label: str,
    model: str,
    conc: int,
    interval: int,
    shape: str | None,
    payload: str,
    extra: tuple[str, ...] = (),
    health: bool = True,
) -> Row:
    try:
        port = server.wait(ready_check=health)
        return measure(server, label, port, model, conc, interval, shape, payload, extra)
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fast-runtime.md"))
    ap.add_argument("--interval", type=int, default=3000, help="perf_analyzer window, ms")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each paired comparison")
    ns = ap.parse_args()
    iv = ns.interval
    rows: dict[str, Row] = {}
    rows["batch_on"] = run_one(
        microtune(name="batching-on"), "batching on", "dense_large", 16, iv, None, "batch 1, 4 KiB"
    )
    rows["batch_off"] = run_one(
        microtune("--dynamic-batching", "false", name="batching-off"),
        "batching off",
        "dense_large",
        16,
        iv,
        None,
        "batch 1, 4 KiB",
    )
    shape = f"INPUT0:{MIB4 // 4}"
    # 500 ms windows: perf_analyzer keeps each window's 4 MiB requests and responses in memory.
    shm = ("--shared-memory", "system", "--output-shared-memory-size", str(MIB4))
    rows["shm"] = run_one(
        microtune("--allow-client-shm", "true", name="shm"),
        "client shm",
        "identity_fp32",
        4,
        500,
        shape,
        "4 MiB in + out",
        shm,
    )
    rows["raw"] = run_one(
        microtune(name="raw"), "raw gRPC bytes", "identity_fp32", 4, 500, shape, "4 MiB in + out"
    )

    def fronts(n: int) -> Callable[[], Row]:
        def run() -> Row:
            server = microtune("--frontends", str(n), name=f"fe{n}")
            return run_one(server, f"--frontends {n}", "simple", 32, iv, None, "batch 1, 128 B")

        return run

    def dense() -> Row:
        return run_one(
            microtune(name="dense"), "microtune", "dense", 16, iv, None, "batch 1, 1 KiB"
        )

    def floor() -> Row:
        server = Proc(
            [
                sys.executable,
                "bench/floor_server.py",
                "--model",
                "dense",
                "--port",
                "0",
                "--statistics",
            ],
            "floor",
        )
        # The floor has no health service: its port file means it serves.
        return run_one(server, "floor", "dense", 16, iv, None, "batch 1, 1 KiB", health=False)

    pairs = {
        "fe": alternate(fronts(2), fronts(1), ns.rounds),
        "dense": alternate(dense, floor, ns.rounds),
    }
    report = render(rows, pairs, iv)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(report)
    print(report)
    return 0


Pair = list[tuple[Row, Row]]  # per round: (the server under test, the one it is held to)


def alternate(a: Callable[[], Row], b: Callable[[], Row], rounds: int) -> Pair:
    """`rounds` runs of each, in the order A B, B A, A B... (drift hits both alike)."""
    out: Pair = []
    for i in range(rounds):
        if i % 2 == 0:
            ra = a()
            rb = b()
        else:
            rb = b()
            ra = a()
        out.append((ra, rb))
    return out


def median_ratio(pair: Pair) -> float:
    return statistics.median(a.infer_s / b.infer_s for a, b in pair)


def render(r: dict[str, Row], pairs: dict[str, Pair], interval: int) -> str:
    load = os.getloadavg()[0]
    lines = [
        "# Fast-runtime benchmark (CPU)",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}; load average at the end "
        f"{load:.1f}; all traffic on 127.0.0.1; perf_analyzer 2.60 over gRPC, "
        f"`--measurement-interval {interval}` (500 ms for the 4 MiB runs).",
        "Command: `python bench/fast_runtime.py`.",
        "",
        "| scenario | model | payload | concurrency | infer/s | p50 (ms) | p99 (ms) "
        "| server CPU (cores) | perf_analyzer CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    paired = [row for pair in pairs.values() for a, b in pair for row in (a, b)]
    for row in [*r.values(), *paired]:
        lines.append(
            f"| {row.server} | {row.model} | {row.payload} | {row.concurrency} | "
            f"{row.infer_s:,.0f} | {row.p50_us / 1000:.3f} | {row.p99_us / 1000:.3f} | "
            f"{row.cpu_cores:.2f} | {row.client_cores:.2f} |"
        )
    on, off = r["batch_on"], r["batch_off"]
    dense_rounds = ", ".join(f"{a.infer_s / b.infer_s:.0%}" for a, b in pairs["dense"])
    fe_rounds = ", ".join(f"{a.infer_s / b.infer_s:.2f}x" for a, b in pairs["fe"])
    bound_us = 3 * (off.p50_us + 2000)  # max queue delay of dense_large: 2 ms
    checks = [
        (
            f"batching on {on.infer_s:,.0f}/s >= 2x off {off.infer_s:,.0f}/s "
            f"({on.infer_s / off.infer_s:.2f}x)",
            on.infer_s >= 2 * off.infer_s,
        ),
        (
            f"batching-on p99 {on.p99_us / 1000:.2f} ms < 3 x (off p50 {off.p50_us / 1000:.2f} ms "
            f"+ 2 ms) = {bound_us / 1000:.2f} ms",
            on.p99_us < bound_us,
        ),
        (
            f"client shm {r['shm'].infer_s:,.0f}/s >= 3x raw {r['raw'].infer_s:,.0f}/s "
            f"({r['shm'].infer_s / r['raw'].infer_s:.2f}x)",
            r["shm"].infer_s >= 3 * r["raw"].infer_s,
        ),
        (
            f"--frontends 2 >= 1.3x --frontends 1: median of {fe_rounds} = "
            f"{median_ratio(pairs['fe']):.2f}x",
            median_ratio(pairs["fe"]) >= 1.3,
        ),
        (
            f"dense c=16 >= 60% of floor: median of {dense_rounds} = "
            f"{median_ratio(pairs['dense']):.0%}",
            median_ratio(pairs["dense"]) >= 0.6,
        ),
    ]
    lines += ["", "Acceptance (fast-runtime issue, CPU part):", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    cores = os.cpu_count() or 1
    lines += ["", f"CPU in use during the front-process runs (of {cores} cores):", ""]
    for row in paired:
        lines.append(
            f"- {row.server} ({row.model}): server {row.cpu_cores:.2f} + perf_analyzer "
            f"{row.client_cores:.2f} = {row.cpu_cores + row.client_cores:.2f} cores"
        )
    lines += ["", "Commands (PORT = the server's port):", ""]
    firsts = [row for pair in pairs.values() for row in pair[0]]
    for row in [*r.values(), *firsts]:
        lines.append(f"    {row.server}: {row.command}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
