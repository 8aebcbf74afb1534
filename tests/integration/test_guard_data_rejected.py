"""The canary guard against a canary that refuses its requests' data as it runs (onnxruntime's
INVALID_ARGUMENT, e.g. a Gather index out of range in its graph): clients get
INVALID_ARGUMENT with onnxruntime's message, and the guard counts those failures against the
canary (it left them out as client mistakes, so a canary failing every request was never
rolled back). Requests refused before they run (a wrong shape) still do not count: the guard
compares the canary's error rate with stable's, and client mistakes would reach both alike."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import Server, running_server
from routing_support import admin_stub, apb, copy_dense, dense_request, write_rejecting_version
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

Code = grpc.StatusCode
GUARD = {"window_s": 30, "min_samples": 20, "max_error_rate_delta": 0.05}
TABLE = {
    "weights": {"1": 5000, "2": 5000},
    "labels": {"stable": 1, "canary": 2},
    "guard": GUARD,
}


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    repo = tmp_path / "repo"
    model = copy_dense(repo, "dense", versions={1: 1})
    write_rejecting_version(model, 2)
    with running_server(repo, tmp_path / "log", ("--model-control-mode", "none")) as s:
        yield s


def test_a_canary_refusing_data_is_rolled_back(server: Server) -> None:
    with grpc.insecure_channel(server.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        admin = admin_stub(ch)
        admin.SetRouting(apb.SetRoutingRequest(model="dense", table_json=json.dumps(TABLE)))
        codes: dict[str, list[Code]] = {"1": [], "2": []}
        give_up = time.monotonic() + 60
        while admin.GetRouting(apb.GetRoutingRequest(model="dense")).guard_rollbacks == 0:
            assert time.monotonic() < give_up, f"the guard did not fire: {codes}"
            for key in range(20):
                req = dense_request(parameters={"routing_key": f"user-{key}"})
                try:
                    resp = stub.ModelInfer(req, timeout=10)
                    codes[resp.model_version].append(Code.OK)
                except grpc.RpcError as e:
                    assert e.code() == Code.INVALID_ARGUMENT, e.details()
                    assert "indices element out of data bounds" in (e.details() or "")
                    codes["2"].append(e.code())
        assert set(codes["1"]) == {Code.OK} and set(codes["2"]) == {Code.INVALID_ARGUMENT}
        status = admin.GetRouting(apb.GetRoutingRequest(model="dense"))
        assert json.loads(status.table_json)["weights"] == {"1": 10_000, "2": 0}
        assert "canary version 2 error rate 100.00%" in status.last_rollback_reason
        # Rolled back: every key on stable now.
        served = {
            stub.ModelInfer(
                dense_request(parameters={"routing_key": f"user-{k}"}), timeout=10
            ).model_version
            for k in range(20)
        }
        assert served == {"1"}


def test_requests_refused_before_they_run_are_not_counted(server: Server) -> None:
    with grpc.insecure_channel(server.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        admin = admin_stub(ch)
        table = {**TABLE, "weights": {"1": 10_000, "2": 0}}
        admin.SetRouting(apb.SetRoutingRequest(model="dense", table_json=json.dumps(table)))
        for _ in range(60):  # the canary pinned with a wrong shape: refused before it runs
            req = pb.ModelInferRequest(model_name="dense", model_version="2")
            req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3])
            req.raw_input_contents.append(b"\0" * 12)
            with pytest.raises(grpc.RpcError) as ei:
                stub.ModelInfer(req, timeout=10)
            assert ei.value.code() == Code.INVALID_ARGUMENT
        for _ in range(30):
            stub.ModelInfer(dense_request(), timeout=10)
        assert admin.GetRouting(apb.GetRoutingRequest(model="dense")).guard_rollbacks == 0
