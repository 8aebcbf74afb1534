"""Prometheus: a running `python -m server serve` scraped over loopback.

- the scrape passes `promtool check metrics` and counts exactly the requests sent;
- a real Prometheus (the Debian package, unpacked by scripts/install_prometheus.sh) scrapes it
  every second and answers PromQL on request rate and the p99 latency;
- with `--frontends 2`, one scrape of the pod port shows the requests of both fronts;
- without NVML there is no `microtune_gpu_*` family and one log line says why.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from obs_support import (
    ServerProcess,
    doc_promql,
    fp32_request,
    free_port,
    json_log_records,
    promtool_check,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from server._proto.inference import grpc_service_pb2_grpc as pbg
from server.telemetry.gpu import NvmlProbe, NvmlUnavailable

RATE = "sum(rate(microtune_requests_total[10s]))"
P99 = "histogram_quantile(0.99, sum by (le) (rate(microtune_request_duration_seconds_bucket[10s])))"


# ----------------------------------------------------------------------------- helpers


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return bytes(r.read())


def sample_sum(exposition: bytes, sample: str, **labels: str) -> float:
    """Sum of every sample named `sample` whose labels include `labels`."""
    return sum(
        s.value
        for fam in text_string_to_metric_families(exposition.decode())
        for s in fam.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def families(exposition: bytes) -> set[str]:
    return {fam.name for fam in text_string_to_metric_families(exposition.decode())}


def nvml_here() -> bool:
    try:
        NvmlProbe().close()
    except NvmlUnavailable:
        return False
    return True


class Traffic:
    """Background ModelInfer calls on `channels` separate connections for at most `seconds`
    (and at most `limit` requests); counts what was sent and how it ended."""

    def __init__(self, target: str, channels: int = 1, seconds: float = 10.0, limit: int = 5000):
        self.target, self.channels, self.seconds, self.limit = target, channels, seconds, limit
        self.ok = self.failed = self._issued = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, i: int) -> None:
        # A local subchannel pool: each channel gets its own TCP connection, so the kernel's
        # SO_REUSEPORT hash can send it to any front.
        opts = [("grpc.use_local_subchannel_pool", 1)]
        deadline = time.monotonic() + self.seconds
        with grpc.insecure_channel(self.target, options=opts) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:  # take a request number first: never more than `limit`
                    if self._issued >= self.limit:
                        return
                    n = self._issued
                    self._issued += 1
                # One request in 20 fails in the worker (rows4 with 3 values: INTERNAL).
                req = fp32_request("rows4", 3) if n % 20 == 19 else fp32_request("dense")
                try:
                    stub.ModelInfer(req, timeout=10)
                    ok = True
                except grpc.RpcError as exc:
                    assert exc.code() is grpc.StatusCode.INTERNAL, exc
                    ok = False
                with self._lock:
                    self.ok += ok
                    self.failed += not ok
                time.sleep(0.002)

    def __enter__(self) -> Traffic:
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.channels)
        ]
        for t in self._threads:
            t.start()
        return self

    def wait(self) -> None:
        for t in self._threads:
            t.join(self.seconds + 30)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.wait()

    @property
    def sent(self) -> int:
        return self.ok + self.failed


class Prometheus:
    """A throwaway Prometheus scraping one target every second, storage in `tmp`."""

    def __init__(self, bin_dir: Path, tmp: Path, target: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: microtune\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.port = free_port()
        self.log_path = tmp / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(bin_dir / "prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )
        try:
            wait_for(self._ready, 30, f"prometheus ready on :{self.port}", 0.2)
        except BaseException:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"prometheus did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return list(body["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        """The value of a one-element vector result; None while the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


@pytest.fixture
def server_args(model_repository: Path) -> list[str]:
    return ["--model-repository", str(model_repository), "--log-format", "json"]


# ----------------------------------------------------------------------------- one front


@pytest.fixture
def single_front(tmp_path: Path, server_args: list[str]) -> Iterator[tuple[ServerProcess, int]]:
    metrics_port = free_port()
    with ServerProcess(
        tmp_path / "server", [*server_args, "--metrics-port", str(metrics_port)]
    ) as server:
        yield server, metrics_port


def test_real_prometheus_scrapes_and_answers_promql(
    single_front: tuple[ServerProcess, int], prometheus_bin: Path, tmp_path: Path
) -> None:
    server, metrics_port = single_front
    prom = Prometheus(prometheus_bin, tmp_path / "prometheus", f"127.0.0.1:{metrics_port}")
    try:
        # Stops when the block ends; 60 s is only the bound.
        with Traffic(server.target, channels=2, seconds=60.0, limit=20_000) as traffic:
            time.sleep(6.0)  # several scrapes of live traffic

            def answers() -> tuple[float, float] | None:
                rate, p99 = prom.scalar(RATE), prom.scalar(P99)
                if rate is None or p99 is None or rate <= 0 or math.isnan(p99):
                    return None
                return rate, p99

            rate, p99 = wait_for(answers, 20, f"PromQL answers\n{prom.log()}", 0.5)
            assert prom.scalar('up{job="microtune"}') == 1.0
            # Rates of successes and failures are both visible, by outcome and status code.
            by_code = {
                r["metric"]["code"]: float(r["value"][1])
                for r in prom.query("sum by (code) (rate(microtune_requests_total[10s]))")
            }
            assert by_code.get("OK", 0) > 0 and "INTERNAL" in by_code, by_code
            # Every example of docs/observability.md is valid PromQL on this server's series.
            for promql in doc_promql():
                prom.query(promql)
            p99_by_version = prom.query(next(q for q in doc_promql() if "le, version" in q))
            assert p99_by_version and all(
                r["metric"]["version"] in ("1", "2") for r in p99_by_version
            )
        assert traffic.sent > 0 and traffic.failed > 0
        assert rate > 0
        assert 0 < p99 < 10.0, p99  # a latency in seconds, inside the histogram's range
    finally:
        assert prom.stop() == 0, prom.log()
    # Once traffic stopped the counters hold exactly what was sent.
    exposition = scrape(metrics_port)
    assert sample_sum(exposition, "microtune_requests_total") == traffic.sent
    assert sample_sum(exposition, "microtune_requests_total", outcome="failure") == traffic.failed
    assert (
        sample_sum(exposition, "microtune_requests_total", code="INTERNAL", model="rows4")
        == traffic.failed
    )


def test_scrape_passes_promtool_and_gpu_metrics_are_absent_without_nvml(
    single_front: tuple[ServerProcess, int], prometheus_bin: Path
) -> None:
    server, metrics_port = single_front
    with Traffic(server.target, seconds=30.0, limit=60) as traffic:
        traffic.wait()
    exposition = scrape(metrics_port)
    promtool_check(prometheus_bin, exposition)
    assert sample_sum(exposition, "microtune_requests_total") == traffic.sent == 60
    # Executions, inferences and batch sizes are there to derive the average batch size.
    assert sample_sum(exposition, "microtune_inferences_total", model="dense") == traffic.ok
    assert sample_sum(exposition, "microtune_executions_total", model="dense") == traffic.ok
    assert sample_sum(exposition, "microtune_saturation_ratio", model="dense") >= 0
    if nvml_here():
        pytest.skip("NVML works on this machine: the GPU-absent case cannot be checked")
    assert not {f for f in families(exposition) if f.startswith("microtune_gpu_")}
    gpu_lines = [r for r in json_log_records(server.stderr()) if "GPU metrics off" in r["msg"]]
    assert len(gpu_lines) == 1, gpu_lines
    assert gpu_lines[0]["level"] == "INFO"


# ----------------------------------------------------------------------------- several fronts


def front_metrics_urls(tmp: Path) -> list[str]:
    """The fronts' private metrics URLs, from the files they announce them in (the supervisor's
    temporary directory is under TMPDIR, which the test points at `tmp`)."""
    urls = []
    for f in sorted(tmp.glob("microtune-*/metrics-*")):
        parts = f.read_text().split()
        if len(parts) == 2:
            urls.append(parts[1])
    return urls


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return bytes(r.read())


def test_pod_scrape_sums_every_front(
    tmp_path: Path, server_args: list[str], prometheus_bin: Path
) -> None:
    metrics_port = free_port()
    sup_tmp = tmp_path / "tmpdir"
    sup_tmp.mkdir()
    args = [*server_args, "--frontends", "2", "--metrics-port", str(metrics_port)]
    with ServerProcess(tmp_path / "server", args, env={"TMPDIR": str(sup_tmp)}) as server:
        # Both fronts have loaded the models (each reports READY on its private port).
        def fronts_ready() -> list[str]:
            urls = front_metrics_urls(sup_tmp)
            ready = [
                u
                for u in urls
                if sample_sum(fetch(u), "microtune_model_state", model="dense", state="READY")
            ]
            return ready if len(ready) == 2 else []

        urls = wait_for(fronts_ready, 60, "two fronts with dense READY", 0.2)
        n = 160
        with Traffic(server.target, channels=16, seconds=60.0, limit=n) as traffic:
            traffic.wait()
        assert traffic.sent == n
        per_front = [sample_sum(fetch(u), "microtune_requests_total") for u in urls]
        pod = scrape(metrics_port)
        promtool_check(prometheus_bin, pod)
        assert sample_sum(pod, "microtune_requests_total") == n == sum(per_front)
        assert all(c > 0 for c in per_front), f"one front got every connection: {per_front}"
        # Pod-scoped facts are not multiplied by the number of fronts.
        assert sample_sum(pod, "microtune_model_state", model="dense", state="READY") == 2.0
        assert sample_sum(pod, "microtune_inferences_total", model="dense") == traffic.ok
    logs = json_log_records(server.stderr())
    if not nvml_here():
        assert not {f for f in families(pod) if f.startswith("microtune_gpu_")}
        assert len([r for r in logs if "GPU metrics off" in r["msg"]]) == 1
