"""Shared pieces of the benchmarks: server subprocesses, perf_analyzer runs, CPU accounting.

Every load generator targets 127.0.0.1 only and runs for a bounded window.
"""

from __future__ import annotations

import csv
import os
import resource
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PA = ROOT / "bench" / "tools" / "perf_analyzer"

__all__ = ["PA", "ROOT", "Proc", "Row", "measure", "perf", "tree_cpu_seconds", "wait_ready"]


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
    client_cores: float = 0.0  # perf_analyzer's CPU seconds per wall second


class Proc:
    """A server subprocess that writes its port to a file."""

    def __init__(self, args: list[str], name: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"bench-{name}-")
        self.port_file = Path(self.tmp) / "port"
        self.log = open(Path(self.tmp) / "log", "w")  # noqa: SIM115 - closed in stop()
        # The repo, after what the caller's PYTHONPATH holds (onnxruntime-gpu on the GPU host).
        path = [p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.p = subprocess.Popen(
            [*args, "--port-file", str(self.port_file)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.name = name

    def wait(self, ready_check: bool, timeout_s: float = 120.0) -> int:
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists() or not self.port_file.read_text().strip():
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: see {self.log.name}")
            time.sleep(0.05)
        port = int(self.port_file.read_text())
        if ready_check and not wait_ready(port, deadline):
            raise RuntimeError(f"{self.name} did not become ready: see {self.log.name}")
        return port

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.p.pid)

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def wait_ready(port: int, deadline: float) -> bool:
    """Whether the server on 127.0.0.1:`port` reports readiness SERVING before `deadline`
    (time.monotonic())."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    return False


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and all its descendants, from /proc."""
    return sum(_proc_cpu(p) for p in [pid, *_children(pid)])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for k in f.read_text().split():
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


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for children (perf_analyzer runs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def perf(
    model: str,
    port: int,
    concurrency: int,
    interval_ms: int,
    shape: str | None,
    extra: tuple[str, ...] = (),
    batch: int = 1,
) -> tuple[dict[str, float], str]:
    """One perf_analyzer run over gRPC against 127.0.0.1:`port`: its CSV row (latencies in
    microseconds) and the command as shown in reports. `shape` (a `--shape` value) is for
    models without batching; otherwise each request holds `batch` rows (`-b`)."""
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
        args += ["-b", str(batch)]
    args += list(extra)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode == 2 and "--stability-percentage" not in args:
        # No three windows within perf_analyzer's default 10% of each other (a shared 2-core
        # machine is noisy): measure three fixed windows instead and keep their average.
        args += ["--stability-percentage", "1000", "--max-trials", "3"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        os.unlink(csv_path)
        # Its errors go to stderr ("error: ..."), its settings and progress to stdout.
        detail = "\n".join(t for t in (proc.stderr.strip()[-2000:], proc.stdout[-2000:]) if t)
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}): {detail}")
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
    extra: tuple[str, ...] = (),
) -> Row:
    c0, t0, k0 = server.cpu_seconds(), time.monotonic(), _children_cpu()
    r, cmd = perf(model, port, conc, interval, shape, extra)
    wall = time.monotonic() - t0
    cpu = (server.cpu_seconds() - c0) / wall
    client = (_children_cpu() - k0) / wall
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
        client,
    )
