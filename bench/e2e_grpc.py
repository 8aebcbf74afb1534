"""End-to-end latency of ModelInfer through a real microtune server, for bench/gpu_bench.py.

`E2EServer` writes a model repository holding the benchmark's models (max_batch_size 8, dynamic
batching with no queue delay: served from CUDA graphs by a GPU worker, by the CPU graph
executor with `--cpu-graphs` on a CPU), starts `python -m server serve` on it with this
interpreter and environment (onnxruntime-gpu from PYTHONPATH on the GPU machine), and waits for
gRPC health "readiness". `time` then sends one request of `b` rows at a time (concurrency 1)
and returns the wall time of each call as this process sees it: the request is serialized
once and travels as bytes through a generic unary-unary call, so the client's own cost per
call is the gRPC channel's alone. This is what the issue's "end-to-end p50 at concurrency 1"
compares with onnxruntime in-process (IOBinding + graphs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE = 256 * 1024 * 1024
CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {row} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {out} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
"""


class E2EServer:
    """A microtune server on the models {name: (onnx file, input row shape, output row shape)}."""

    def __init__(
        self,
        models: dict[str, tuple[Path, tuple[int, ...], tuple[int, ...]]],
        device: str,
        start_timeout_s: float = 600.0,
    ) -> None:
        self.models = models
        self.device = device
        self.start_timeout_s = start_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="e2e-grpc-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self.args: list[str] = []

    def __enter__(self) -> E2EServer:
        tmp = Path(self._tmp.name)
        repo = tmp / "models"
        for name, (path, row, out) in self.models.items():
            (repo / name / "1").mkdir(parents=True)
            shutil.copyfile(path, repo / name / "1" / "model.onnx")
            (repo / name / "config.pbtxt").write_text(
                CONFIG.format(name=name, row=", ".join(map(str, row)), out=", ".join(map(str, out)))
            )
        device = ["--device", "cpu", "--cpu-graphs", "true"] if self.device == "cpu" else [
            "--device", self.device
        ]  # fmt: skip
        self.args = [
            "--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "-1",
            "--tracing", "off", "--log-level", "WARNING", *device,
        ]  # fmt: skip
        port_file = tmp / "port"
        self._log = open(tmp / "server.log", "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", *self.args, "--port-file", str(port_file)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p
            )},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            self._wait_ready(port_file)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, port_file: Path) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + self.start_timeout_s
        assert self._proc is not None
        while not (port_file.exists() and port_file.read_text().strip()):
            self._check_alive(deadline)
            time.sleep(0.1)
        self._channel = grpc.insecure_channel(
            f"127.0.0.1:{port_file.read_text().strip()}",
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ],
        )
        health = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service="readiness")
        while True:
            try:
                if health.Check(request).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            self._check_alive(deadline)
            time.sleep(0.2)

    def _check_alive(self, deadline: float) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not get ready:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        path = Path(self._tmp.name) / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def time(
        self, name: str, x: np.ndarray, warmup: int, iters: int
    ) -> tuple[list[float], np.ndarray]:
        """Per-call wall time (microseconds) of `iters` ModelInfer calls of `x` after `warmup`
        untimed ones, and the output of the last call."""
        from server._proto.inference import grpc_service_pb2 as pb

        assert self._channel is not None
        req = pb.ModelInferRequest(model_name=name)
        req.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
        payload = req.SerializeToString()
        call = self._channel.unary_unary(METHOD)  # bytes in, bytes out
        for _ in range(warmup):
            call(payload)
        out: list[float] = []
        raw = b""
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            raw = call(payload)
            out.append((time.perf_counter_ns() - t0) / 1000.0)
        resp = pb.ModelInferResponse.FromString(raw)
        shape = tuple(resp.outputs[0].shape)
        return out, np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(shape)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if hasattr(self, "_log"):
            self._log.close()
        self._tmp.cleanup()
