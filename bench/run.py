"""One benchmark run: microtune vs the no-work "floor" server vs in-process onnxruntime.

    python bench/run.py [--quick] [--out bench/results/serving-core.md]

Starts microtune on the demo repository and one floor server per model (bench/floor_server.py:
a bare grpc.aio server answering with a precomputed response), drives each with perf_analyzer
over gRPC on 127.0.0.1 at concurrency 1, 4 and 16 with identical flags, measures the server's
CPU (front + worker, from /proc), runs the same models in-process with onnxruntime, and writes a
markdown table with the exact commands and the acceptance checks of the serving-core issue.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PA = ROOT / "bench" / "tools" / "perf_analyzer"
sys.path.insert(0, str(ROOT))


@dataclass
class Row:
    server: str
    model: str
    concurrency: int
    payload: str
    infer_s: float
    p50_us: float
    p99_us: float
    cpu_cores: float  # server CPU seconds per wall second (front + worker)
    command: str


class Proc:
    """A server subprocess that writes its port to a file."""

    def __init__(self, args: list[str], name: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"bench-{name}-")
        self.port_file = Path(self.tmp) / "port"
        self.log = open(Path(self.tmp) / "log", "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.p = subprocess.Popen(
            [*args, "--port-file", str(self.port_file)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.name = name

    def wait(self, ready_check: bool) -> int:
        deadline = time.monotonic() + 120
        while not self.port_file.exists() or not self.port_file.read_text().strip():
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: see {self.log.name}")
            time.sleep(0.05)
        port = int(self.port_file.read_text())
        if ready_check:
            _wait_health(port, deadline)
        return port

    def cpu_seconds(self) -> float:
        return sum(_proc_cpu(pid) for pid in [self.p.pid, *_children(self.p.pid)])

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def _wait_health(port: int, deadline: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            for k in kids:
                out += [int(k), *_children(int(k))]
    except OSError:
        pass
    return out


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def perf(
    model: str, port: int, concurrency: int, interval_ms: int, shape: str | None
) -> tuple[dict[str, float], str]:
    with tempfile.NamedTemporaryFile(suffix=".csv", delete=False) as f:
        csv_path = f.name
    args = [
        str(PA),
        "-m",
        model,
        "-u",
        f"127.0.0.1:{port}",
        "-i",
        "grpc",
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(interval_ms),
        "-f",
        csv_path,
    ]
    if shape:
        args += ["--shape", shape]
    else:
        args += ["-b", "1"]
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    with open(csv_path) as fh:
        row = next(csv.DictReader(fh))
    os.unlink(csv_path)
    shown = " ".join(shlex.quote(a) for a in ["perf_analyzer", *args[1:]] if a != csv_path)
    shown = shown.replace(f"127.0.0.1:{port}", "127.0.0.1:$PORT").replace(" -f", "")
    return {k: float(v) for k, v in row.items()}, shown


def measure(
    server: Proc,
    name: str,
    port: int,
    model: str,
    conc: int,
    interval: int,
    shape: str | None,
    payload: str,
) -> Row:
    c0, t0 = server.cpu_seconds(), time.monotonic()
    r, cmd = perf(model, port, conc, interval, shape)
    cpu = (server.cpu_seconds() - c0) / (time.monotonic() - t0)
    return Row(
        name,
        model,
        conc,
        payload,
        r["Inferences/Second"],
        r["p50 latency"],
        r["p99 latency"],
        cpu,
        cmd,
    )


def in_process(
    model_path: Path, feeds_of: dict[str, tuple[str, tuple[int, ...]]], conc: int, seconds: float
) -> tuple[float, float, float]:
    """Raw onnxruntime in this process: (infer/s, p50 us, p99 us) with `conc` threads."""
    import threading

    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    feeds = {k: np.ones(s, dtype=dt) for k, (dt, s) in feeds_of.items()}
    lat: list[list[float]] = [[] for _ in range(conc)]
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            t = time.perf_counter()
            sess.run(None, feeds)
            lat[i].append(time.perf_counter() - t)

    for _ in range(50):
        sess.run(None, feeds)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(conc)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    all_lat = sorted(x for xs in lat for x in xs)
    n = len(all_lat)
    return n / wall, all_lat[n // 2] * 1e6, all_lat[min(n - 1, int(n * 0.99))] * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter intervals (smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving-core.md"))
    ns = ap.parse_args()
    interval = 1000 if ns.quick else 3000
    subprocess.run([str(PA), "--version"], check=True, capture_output=True)  # installs it

    py = sys.executable
    repo = ROOT / "server" / "demo_repository"
    micro = Proc(
        [
            py,
            "-m",
            "server",
            "serve",
            "--grpc-port",
            "0",
            "--log-level",
            "WARNING",
            "--model-repository",
            str(repo),
        ],
        "microtune",
    )
    floors = {
        m: Proc([py, "bench/floor_server.py", "--model", m, "--port", "0"], f"floor-{m}")
        for m in ("dense", "identity_fp32")
    }
    rows: list[Row] = []
    try:
        mport = micro.wait(ready_check=True)
        fports = {m: p.wait(ready_check=False) for m, p in floors.items()}
        mib = "INPUT0:262144"  # 1 MiB of FP32
        plan = [("dense", None, "batch 1, 1 KiB"), ("simple", None, "batch 1, 128 B")]
        for model, shape, payload in plan:
            for conc in (1, 4, 16):
                rows.append(
                    measure(micro, "microtune", mport, model, conc, interval, shape, payload)
                )
                if model in floors:
                    rows.append(
                        measure(
                            floors[model],
                            "floor",
                            fports[model],
                            model,
                            conc,
                            interval,
                            shape,
                            payload,
                        )
                    )
        for conc in (1, 4):
            rows.append(
                measure(
                    micro, "microtune", mport, "identity_fp32", conc, interval, mib, "1 MiB FP32"
                )
            )
            rows.append(
                measure(
                    floors["identity_fp32"],
                    "floor",
                    fports["identity_fp32"],
                    "identity_fp32",
                    conc,
                    interval,
                    mib,
                    "1 MiB FP32",
                )
            )
    finally:
        micro.stop()
        for p in floors.values():
            p.stop()

    ort_rows = []
    for model, feeds in (
        ("dense", {"INPUT0": ("float32", (1, 256))}),
        ("simple", {"INPUT0": ("int32", (1, 16)), "INPUT1": ("int32", (1, 16))}),
    ):
        for conc in (1, 4, 16):
            ort_rows.append(
                (
                    model,
                    conc,
                    *in_process(
                        repo / model / "1" / "model.onnx", feeds, conc, 1.0 if ns.quick else 3.0
                    ),
                )
            )
    report = render(rows, ort_rows, ns.quick)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(report)
    print(report)
    return 0


def _find(rows: list[Row], server: str, model: str, conc: int) -> Row:
    return next(r for r in rows if (r.server, r.model, r.concurrency) == (server, model, conc))


def render(
    rows: list[Row], ort_rows: list[tuple[str, int, float, float, float]], quick: bool
) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Serving-core benchmark",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}; all traffic on "
        "127.0.0.1; perf_analyzer 2.60 (gRPC, `--measurement-interval "
        f"{1000 if quick else 3000}`) and both servers on the same 2 cores.",
        "Command: `make bench` (= `python bench/run.py`).",
        "",
        "| server | model | payload | concurrency | infer/s | p50 (ms) | p99 (ms) "
        "| server CPU (cores) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.server} | {r.model} | {r.payload} | {r.concurrency} | "
            f"{r.infer_s:,.0f} | {r.p50_us / 1000:.3f} | {r.p99_us / 1000:.3f} | "
            f"{r.cpu_cores:.2f} |"
        )
    lines += [
        "",
        "In-process onnxruntime (CPU EP, 1 intra-op thread, N Python threads, batch 1):",
        "",
        "| model | threads | infer/s | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|---|",
    ]
    for model, conc, ips, p50, p99 in ort_rows:
        lines.append(f"| {model} | {conc} | {ips:,.0f} | {p50 / 1000:.3f} | {p99 / 1000:.3f} |")
    d1, f1 = _find(rows, "microtune", "dense", 1), _find(rows, "floor", "dense", 1)
    d16, f16 = _find(rows, "microtune", "dense", 16), _find(rows, "floor", "dense", 16)
    i4, fi4 = (
        _find(rows, "microtune", "identity_fp32", 4),
        _find(rows, "floor", "identity_fp32", 4),
    )
    checks = [
        (
            f"dense c=1 p50 {d1.p50_us / 1000:.3f} ms <= floor p50 "
            f"{f1.p50_us / 1000:.3f} + 0.35 ms",
            d1.p50_us <= f1.p50_us + 350,
        ),
        (
            f"dense c=16 throughput {d16.infer_s:,.0f} >= 40% of floor {f16.infer_s:,.0f} "
            f"({d16.infer_s / f16.infer_s:.0%})",
            d16.infer_s >= 0.4 * f16.infer_s,
        ),
        (
            f"identity 1 MiB c=4 throughput {i4.infer_s:,.0f} >= 50% of floor {fi4.infer_s:,.0f} "
            f"({i4.infer_s / fi4.infer_s:.0%})",
            i4.infer_s >= 0.5 * fi4.infer_s,
        ),
    ]
    lines += ["", "Acceptance (serving-core issue):", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    lines += [
        "",
        "Commands (PORT = the server's port; floor: `python bench/floor_server.py "
        "--model MODEL --port 0`; microtune: `microtune serve --grpc-port 0`):",
        "",
    ]
    seen: set[str] = set()
    for r in rows:
        if r.command not in seen:
            seen.add(r.command)
            lines.append(f"    {r.command}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
