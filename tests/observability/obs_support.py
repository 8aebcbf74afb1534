"""Helpers of the observability tests: a model repository, an in-process server on its own event
loop, `python -m server serve` subprocesses, Prometheus tools, log and doc parsing.

(A module of its own, not conftest.py: `from conftest import ...` would find whichever
conftest module another test directory loaded first.)

Only microtune's own stubs (server._proto) are used here, never tritonclient: the two register
the same protobuf names, so one process can import only one (tests/integration runs in a
subprocess for that reason). opentelemetry-proto's messages live in another package and are fine.

- `build_repository`: copies of the demo `dense` and `simple`, `dense_batched` (dense with a
  dynamic_batching block, so concurrent requests share an execution) and `rows4`, a batched
  model that fails *at run time* on a row whose length is not a multiple of 4 (a server-side
  failure: status INTERNAL, counted in the statistics' `fail`).
- `LoopThread`: an asyncio loop in a thread, so that one in-process `App` serves a whole session
  while each test drives it with grpc.aio stubs through `run(coro)` (no pytest-asyncio needed).
- `ServerProcess`: the CLI in a subprocess with stdout and stderr captured to files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server._proto.inference import grpc_service_pb2 as pb
from server.settings import DEMO_REPOSITORY

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

BATCH_DELAY_US = 100_000  # dense_batched / rows4: long enough for concurrent requests to meet


# ----------------------------------------------------------------------------- repository


def _batched_copy(src: str, dst: Path, name: str) -> None:
    shutil.copytree(DEMO_REPOSITORY / src, dst / name)
    cfg = (dst / name / "config.pbtxt").read_text().replace(f'name: "{src}"', f'name: "{name}"')
    cfg += f"dynamic_batching {{\n  max_queue_delay_microseconds: {BATCH_DELAY_US}\n}}\n"
    (dst / name / "config.pbtxt").write_text(cfg)


def _rows4_model() -> onnx.ModelProto:
    """OUTPUT0 = Reshape(INPUT0, [0, -1, 4]) (0 keeps the batch dimension, so rows never mix):
    fine for rows of 4k values, an onnxruntime error otherwise, which happens in the worker,
    after the front validated the request."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, -1, 4])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["INPUT0", "shape"], ["OUTPUT0"])],
        "rows4",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "rows", 4])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def build_repository(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dense", "simple"):
        shutil.copytree(DEMO_REPOSITORY / name, root / name)
    _batched_copy("dense", root, "dense_batched")
    (root / "rows4" / "1").mkdir(parents=True)
    onnx.save(_rows4_model(), str(root / "rows4" / "1" / "model.onnx"))
    (root / "rows4" / "config.pbtxt").write_text(
        'name: "rows4"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: {BATCH_DELAY_US} }}\n"
    )
    return root


# ----------------------------------------------------------------------------- requests


def fp32_request(model: str, values: int = 256, request_id: str = "") -> pb.ModelInferRequest:
    """One batch-1 FP32 request on INPUT0 (dense: 256 values; rows4: any multiple of 4)."""
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    t = req.inputs.add()
    t.name, t.datatype = "INPUT0", "FP32"
    t.shape.extend([1, values])
    req.raw_input_contents.append(np.ones((1, values), np.float32).tobytes())
    return req


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- in-process


class LoopThread:
    """An event loop running in a daemon thread; `run(coro)` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="obs-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class InProcess:
    """An `App` started on a LoopThread, with the exporter its spans go to (if any)."""

    def __init__(self, app: Any, loop: LoopThread, exporter: InMemorySpanExporter | None) -> None:
        self.app = app
        self.loop = loop
        self.exporter = exporter
        self.target = f"127.0.0.1:{app.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.loop.run(coro, timeout)


@contextlib.contextmanager
def in_process_app(
    repository: Path, exporter: InMemorySpanExporter | None = None, **settings: Any
) -> Iterator[InProcess]:
    from server.app import App
    from server.settings import Settings

    loop = LoopThread()
    s = Settings(
        model_repository=repository,
        grpc_port=0,
        metrics_port=0,
        log_level="WARNING",
        frontends=1,
        shutdown_grace_s=1.0,
        **settings,
    )

    async def start() -> Any:
        app = App(s, span_exporter=exporter)
        await app.start()
        return app

    app = loop.run(start(), timeout=120)
    try:
        yield InProcess(app, loop, exporter)
    finally:
        loop.run(app.stop(), timeout=60)
        loop.close()


# ----------------------------------------------------------------------------- subprocess


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=1
            )
        except grpc.RpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING


class ServerProcess:
    """`python -m server serve --grpc-port 0 --port-file F ARGS...`, stdout and stderr to files.

    `start()` waits for the port file and grpc.health.v1 readiness (unless told not to); it fails
    with the log if the process exits first. `stop()` sends SIGTERM (a clean shutdown flushes
    spans) and waits.
    """

    def __init__(self, tmp: Path, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.port_file = tmp / "port"
        self.stdout_path = tmp / "stdout"
        self.stderr_path = tmp / "stderr"
        # One front unless the test asks for more (frontends=0 sizes to the machine).
        self.args = list(args) if "--frontends" in args else ["--frontends", "1", *args]
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("MICROTUNE_", "OTEL_"))
        }
        full_env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
        self.env = full_env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0, ready: bool = True) -> ServerProcess:
        """`ready=False`: wait for the port file only (a server meant to stay NOT_SERVING)."""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "server", "serve",
                    "--grpc-port", "0", "--port-file", str(self.port_file), *self.args,
                ],
                stdout=out, stderr=err, cwd=ROOT, env=self.env,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server not ready in {timeout}s:\n{self.stderr()}")
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text and (not ready or _serving(f"127.0.0.1:{int(text)}")):
                self.port = int(text)
                return self
            time.sleep(0.1)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- prometheus

INSTALL_PROMETHEUS = ROOT / "scripts" / "install_prometheus.sh"


def promtool_check(bin_dir: Path, exposition: bytes) -> None:
    """Asserts that `promtool check metrics` finds no problem (lint included) in a scrape."""
    proc = subprocess.run(
        [str(bin_dir / "promtool"), "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=30,
        check=False,
    )
    report = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0 and not report.strip(), report


# ----------------------------------------------------------------------------- logs


def json_log_records(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line parsed as one JSON object, asserting that each one is (onnxruntime's
    native lines included: the worker routes them into the log, runtime/native_stderr.py)."""
    records = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"stderr line is not JSON: {line!r}") from None
        assert isinstance(obj, dict), line
        records.append(obj)
    return records


# ----------------------------------------------------------------------------- docs

OBSERVABILITY_DOC = ROOT / "docs" / "observability.md"


def doc_promql() -> list[str]:
    """Every ```promql block of docs/observability.md (each is one query)."""
    blocks = re.findall(r"```promql\n(.*?)```", OBSERVABILITY_DOC.read_text(), flags=re.S)
    return [" ".join(b.split()) for b in blocks]
