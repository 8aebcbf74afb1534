"""A run whose caller's deadline passed is stopped (onnxruntime's RunOptions.terminate,
runtime/engine/run_deadlines.py). It went on to its end: the client had its DEADLINE_EXCEEDED,
but the run held a thread of the worker's pool for as long as its data said (`spin`'s loop
count here), and the worker's other calls waited behind it."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from harness import running_server
from spin_model import spin_repository, spin_request
from tritonclient.grpc import service_pb2_grpc

Code = grpc.StatusCode
LONG_S = 20.0


def test_a_run_past_its_deadline_frees_the_worker(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    n = spin_repository(repo, LONG_S)
    # One pool thread: a run that went on would hold the worker for LONG_S.
    args = ("--worker-threads", "1")
    with running_server(repo, tmp_path / "log", args) as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(spin_request(n), timeout=1.0)
        assert ei.value.code() == Code.DEADLINE_EXCEEDED
        start = time.monotonic()
        assert stub.ModelInfer(spin_request(1), timeout=LONG_S / 2).model_name == "spin"
        assert time.monotonic() - start < LONG_S / 2


def test_the_request_timeout_parameter_is_a_deadline(tmp_path: Path) -> None:
    """Triton's `timeout` request parameter (microseconds; tritonclient's infer(timeout=...))
    was ignored: the request ran to its end. It is the request's deadline now, and its run is
    stopped there too."""
    repo = tmp_path / "repo"
    n = spin_repository(repo, LONG_S)
    args = ("--worker-threads", "1")
    with running_server(repo, tmp_path / "log", args) as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = spin_request(n)
        req.parameters["timeout"].int64_param = 500_000
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(req)  # no gRPC deadline
        assert ei.value.code() == Code.DEADLINE_EXCEEDED, ei.value.details()
        assert time.monotonic() - start < LONG_S / 2
        assert stub.ModelInfer(spin_request(1), timeout=LONG_S / 2).model_name == "spin"
