"""End-to-end latency of ModelInfer through a real microtune server, for bench/gpu_bench.py.

`E2EServer` writes a model repository holding the benchmark's models (max_batch_size 8, dynamic
batching with no queue delay: served from CUDA graphs by a GPU worker, by the CPU graph
executor with `--cpu-graphs` on a CPU), starts `python -m server serve` on it with this
interpreter and environment (onnxruntime-gpu from PYTHONPATH on the GPU machine; the
benchmarks' `harness.Proc`) plus the caller's `extra_args`, and waits for gRPC health
"readiness". Load generators reach it at 127.0.0.1:`port` (gpu_bench runs perf_analyzer there,
with raw bytes and with CUDA shared memory). `time` is the Python client, the fallback where
perf_analyzer does not run: it sends one request of `b` rows at a time (concurrency 1) and
returns the wall time of each call as this process sees it; the request is serialized once and
travels as bytes through a generic unary-unary call, so the client's own cost per call is the
gRPC channel's alone, yet it is inside the figure (ServerLive p50 ~330 us on the GPU machine).
`phase_totals` reads the server's ModelStatistics, so that a caller can tell the worker's
phases of a run from the rest.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np
from harness import Proc

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE = 256 * 1024 * 1024
CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_{dtype} dims: [ {row} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {out} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
"""
PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")
# INPUT0's numpy element type -> its KServe v2 datatype (OUTPUT0 is FP32 in every model)
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


class E2EServer:
    """A microtune server on the models {name: (onnx file, input row shape, output row shape,
    input element type)}."""

    def __init__(
        self,
        models: dict[str, tuple[Path, tuple[int, ...], tuple[int, ...], type[np.generic]]],
        device: str,
        start_timeout_s: float = 600.0,
        extra_args: list[str] | None = None,
    ) -> None:
        self.models = models
        self.device = device
        self.start_timeout_s = start_timeout_s
        self.extra_args = list(extra_args or [])
        self._tmp = tempfile.TemporaryDirectory(prefix="e2e-grpc-")
        self._proc: Proc | None = None
        self._channel: grpc.Channel | None = None
        self._port: int | None = None
        self.args: list[str] = []

    def __enter__(self) -> E2EServer:
        repo = Path(self._tmp.name) / "models"
        for name, (path, row, out, dtype) in self.models.items():
            (repo / name / "1").mkdir(parents=True)
            shutil.copyfile(path, repo / name / "1" / "model.onnx")
            (repo / name / "config.pbtxt").write_text(
                CONFIG.format(
                    name=name,
                    dtype=DATATYPES[np.dtype(dtype)],
                    row=", ".join(map(str, row)),
                    out=", ".join(map(str, out)),
                )
            )
        device = ["--device", "cpu", "--cpu-graphs", "true"] if self.device == "cpu" else [
            "--device", self.device
        ]  # fmt: skip
        self.args = [
            "--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "-1",
            "--tracing", "off", "--log-level", "WARNING", *device, *self.extra_args,
        ]  # fmt: skip
        self._proc = Proc([sys.executable, "-m", "server", "serve", *self.args], "e2e")
        try:
            self._port = self._proc.wait(ready_check=True, timeout_s=self.start_timeout_s)
        except RuntimeError as exc:
            tail = self._proc.log_tail()
            self.__exit__(None, None, None)
            raise RuntimeError(f"{exc}\n{tail}") from None
        self._channel = grpc.insecure_channel(
            f"127.0.0.1:{self._port}",
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ],
        )
        return self

    @property
    def channel(self) -> grpc.Channel | None:
        """The channel to the server (None before `__enter__`)."""
        return self._channel

    @property
    def port(self) -> int:
        """The server's gRPC port on 127.0.0.1 (once `__enter__` has started it)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    def time(
        self, name: str, x: np.ndarray, warmup: int, iters: int
    ) -> tuple[list[float], np.ndarray]:
        """Per-call wall time (microseconds) of `iters` ModelInfer calls of `x` after `warmup`
        untimed ones, and the output of the last call."""
        from server._proto.inference import grpc_service_pb2 as pb

        assert self._channel is not None
        req = pb.ModelInferRequest(model_name=name)
        req.inputs.add(name="INPUT0", datatype=DATATYPES[x.dtype], shape=list(x.shape))
        req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
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

    def phase_totals(self, name: str) -> dict[str, tuple[int, int]]:
        """The server's ModelStatistics of `name` (all versions) so far: per phase (success,
        queue, compute_input, compute_infer, compute_output), its total ns and count. The
        difference of two snapshots is what the calls between them cost, by the server's
        own account."""
        from server._proto.inference import grpc_service_pb2 as pb
        from server._proto.inference import grpc_service_pb2_grpc as pbg

        assert self._channel is not None
        stub = pbg.GRPCInferenceServiceStub(self._channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=30)
        totals: dict[str, tuple[int, int]] = {}
        for phase in PHASES:
            ns = n = 0
            for s in stats.model_stats:
                d = getattr(s.inference_stats, phase)
                ns, n = ns + d.ns, n + d.count
            totals[phase] = (ns, n)
        return totals

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._proc is not None:
            self._proc.stop()
        self._tmp.cleanup()
