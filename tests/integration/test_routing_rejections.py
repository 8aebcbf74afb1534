"""A rejected routing table, end to end: the table it would have replaced keeps serving and the
rejection is reported (docs/routing.md, "The routing table").

One explicit-mode server on two copies of the demo `dense` model (versions 1 and 2):
  dense       a 90/10 table in its config; reloaded with config overrides whose table is
              invalid, that name a version that fails to load, or that fail for every version
  dense_file  named by the routing file, which starts as JSON nested too deeply to parse
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Server, running_server
from routing_support import (
    AdminStub,
    admin_stub,
    apb,
    copy_dense,
    dense_config_json,
    dense_input,
    dense_request,
    write_corrupt_version,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

Stub = service_pb2_grpc.GRPCInferenceServiceStub
Code = grpc.StatusCode

SPLIT = {"weights": {"1": 9000, "2": 1000}, "labels": {"stable": 1, "canary": 2}}
DEEP = "[" * 100_000  # beyond Python's recursion limit for json
# The routing file is polled every second.
APPLY_WITHIN_S = 3.0


def write_routing_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def routing_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("routing") / "routing.json"
    write_routing_file(path, DEEP)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, routing_file: Path) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("repo")
    copy_dense(repo, "dense", parameters={"routing": json.dumps(SPLIT)})
    copy_dense(repo, "dense_file")
    args = (
        "--model-control-mode", "explicit", "--load-model", "dense,dense_file",
        "--routing-file", str(routing_file),
    )  # fmt: skip
    with running_server(repo, tmp_path_factory.mktemp("server"), args) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.url) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Stub:
    return Stub(channel)


@pytest.fixture(scope="module")
def admin(channel: grpc.Channel) -> AdminStub:
    return admin_stub(channel)


def routing(admin: AdminStub, model: str) -> apb.RoutingStatus:
    return admin.GetRouting(apb.GetRoutingRequest(model=model))


def weights(status: apb.RoutingStatus) -> dict[str, Any] | None:
    return json.loads(status.table_json)["weights"] if status.table_json else None


def split(stub: Stub, model: str) -> Counter[str]:
    """The versions that serve 200 routing keys."""
    served: Counter[str] = Counter()
    for i in range(200):
        resp = stub.ModelInfer(
            dense_request(model), metadata=(("x-routing-key", f"user-{i}"),), timeout=10
        )
        served[resp.model_version] += 1
    return served


def load(stub: Stub, versions: list[int], table: dict[str, Any]) -> None:
    config = json.loads(dense_config_json("dense", versions))
    config["parameters"] = {"routing": {"string_value": json.dumps(table)}}
    req = pb.RepositoryModelLoadRequest(model_name="dense")
    req.parameters["config"].string_param = json.dumps(config)
    stub.RepositoryModelLoad(req, timeout=60)


def test_a_rejected_config_table_leaves_the_previous_one_serving(
    server: Server, stub: Stub, admin: AdminStub
) -> None:
    """The config table was dropped instead: a 90/10 split became 100% for version 2, the
    canary, with GetRouting saying `source: none`."""
    before = split(stub, "dense")
    assert routing(admin, "dense").source == "config" and set(before) == {"1", "2"}
    assert before["1"] > before["2"], before

    # A typo in a weight: the load succeeds, its table is rejected.
    load(stub, [1, 2], {**SPLIT, "weights": {"1": 9000, "2": 500}})
    status = routing(admin, "dense")
    assert status.source == "config" and weights(status) == {"1": 9000, "2": 1000}
    assert split(stub, "dense") == before
    assert (
        "model dense: the routing table in its config is rejected (the previous one keeps "
        "serving): invalid routing table: weights must sum to 10000 basis points, got 9500 "
        "(1: 9000, 2: 500)"
    ) in server.log()

    # A load that fails on the version its table names: versions 1 and 2 serve on, and so
    # does their table.
    write_corrupt_version(server.repository / "dense", 3)
    with pytest.raises(grpc.RpcError) as ei:
        load(stub, [1, 2, 3], {"weights": {"1": 9000, "3": 1000}, "labels": {"stable": 1}})
    assert ei.value.code() == Code.INTERNAL
    assert (ei.value.details() or "").startswith("failed to load 'dense': version 3: ")
    status = routing(admin, "dense")
    assert status.source == "config" and weights(status) == {"1": 9000, "2": 1000}
    assert split(stub, "dense") == before
    assert "version 3, which is not loaded" not in server.log()  # (a failed load's: not tried)


def test_a_load_that_fails_leaves_the_config_in_force_and_its_table(
    server: Server, stub: Stub, admin: AdminStub
) -> None:
    """A config that no version loads with (an input of another datatype), with a valid table
    of its own: the versions served on with their instances, but the failed config's table
    took over (every request to version 2) and ModelConfig reported that config
    (max_batch_size 2), while requests of 6 rows were still accepted."""
    before, config = split(stub, "dense"), stub.ModelConfig(pb.ModelConfigRequest(name="dense"))
    assert set(before) == {"1", "2"} and config.config.max_batch_size == 8

    failing = json.loads(dense_config_json("dense", [1, 2]))
    failing["max_batch_size"] = 2
    failing["input"][0]["data_type"] = "TYPE_INT32"
    failing["parameters"] = {"routing": {"string_value": json.dumps({"weights": {"2": 10000}})}}
    req = pb.RepositoryModelLoadRequest(model_name="dense")
    req.parameters["config"].string_param = json.dumps(failing)
    with pytest.raises(grpc.RpcError) as ei:
        stub.RepositoryModelLoad(req, timeout=60)
    assert ei.value.code() == Code.INTERNAL
    assert (ei.value.details() or "").startswith(
        "failed to load 'dense': version 1: config input 'INPUT0' is INT32 but the ONNX graph "
        "has FP32"
    )

    status = routing(admin, "dense")
    assert status.source == "config" and weights(status) == {"1": 9000, "2": 1000}
    assert split(stub, "dense") == before
    for version in ("", "1", "2"):
        got = stub.ModelConfig(pb.ModelConfigRequest(name="dense", version=version))
        assert got.config == config.config, version
    resp = stub.ModelInfer(dense_request("dense", "2", x=dense_input(batch=6)), timeout=10)
    assert resp.outputs[0].shape == [6, 10]


def test_a_routing_file_nested_too_deeply_is_reported_from_start_up(
    admin: AdminStub, routing_file: Path
) -> None:
    """At start-up it killed the server with a RecursionError traceback; while serving, the
    error was never reported (`file_error` stayed empty)."""
    deep_error = (
        f"{routing_file}: routing file is refused: its JSON is nested too deeply; "
        "the previous tables keep serving"
    )
    status = routing(admin, "dense_file")
    assert status.source == "none" and status.file_error == deep_error

    table = {"weights": {"1": 0, "2": 10000}}
    write_routing_file(routing_file, json.dumps({"models": {"dense_file": table}}))
    start = time.monotonic()
    while (status := routing(admin, "dense_file")).source != "file":
        assert time.monotonic() - start < APPLY_WITHIN_S, status
        time.sleep(0.05)
    assert status.file_error == ""

    write_routing_file(routing_file, DEEP)
    start = time.monotonic()
    while not (status := routing(admin, "dense_file")).file_error:
        assert time.monotonic() - start < APPLY_WITHIN_S, status
        time.sleep(0.05)
    assert status.file_error == deep_error
    time.sleep(1.5)  # the next polls, the same bytes: still reported
    status = routing(admin, "dense_file")
    assert status.file_error == deep_error
    assert status.source == "file" and weights(status) == {"1": 0, "2": 10000}
