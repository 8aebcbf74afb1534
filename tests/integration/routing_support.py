"""Helpers of the routing, model-control and hot-swap tests (no fixtures; see conftest.py).

Repositories made of the demo `dense` model (INPUT0 FP32 [256] -> OUTPUT0 FP32 [10], versions 1
and 2 with different weights), requests for it, the RoutingAdmin stub, and two broken versions
for the lifecycle tests: one whose file is not ONNX and one that loads, warms up (zeros) and
then fails at run time on any other input.

The RoutingAdmin stub is microtune's own generated code (server._proto.microtune.admin_pb2).
Importing it beside tritonclient is safe: package `microtune.admin.v1` has no dependency on the
inference protos, whose names are the ones that clash (see conftest.py); importing
server._proto.inference here would not be.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from harness import DEMO, IR_VERSION, OPSET
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2 as pb

from server._proto.microtune import admin_pb2 as apb
from server._proto.microtune import admin_pb2_grpc as apb_grpc

__all__ = [
    "DENSE_CONFIG",
    "ROUTE_REASON",
    "AdminStub",
    "admin_stub",
    "apb",
    "copy_dense",
    "dense_config_json",
    "dense_input",
    "dense_request",
    "write_corrupt_version",
    "write_failing_version",
    "write_golden",
]

ROUTE_REASON = "x-route-reason"
DENSE_CONFIG = (DEMO / "dense" / "config.pbtxt").read_text()
AdminStub = apb_grpc.RoutingAdminStub


def admin_stub(channel: grpc.Channel | grpc.aio.Channel) -> apb_grpc.RoutingAdminStub:
    return apb_grpc.RoutingAdminStub(channel)


def copy_dense(
    repo: Path,
    name: str = "dense",
    versions: Mapping[int, int] | None = None,
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """`repo/name`: the demo dense model's config (renamed, plus `parameters`) and version
    directories; `versions` maps a new version number to the demo version copied (default
    {1: 1, 2: 2})."""
    model = repo / name
    for new, demo in (versions or {1: 1, 2: 2}).items():
        (model / str(new)).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEMO / "dense" / str(demo) / "model.onnx", model / str(new) / "model.onnx")
    text = DENSE_CONFIG.replace('name: "dense"', f'name: "{name}"')
    for key, value in (parameters or {}).items():
        # A protobuf text string: json.dumps quotes and escapes it the way text format reads.
        value_text = f"{{ string_value: {json.dumps(value)} }}"
        text += f"parameters {{ key: {json.dumps(key)} value: {value_text} }}\n"
    (model / "config.pbtxt").write_text(text)
    return model


def dense_config_json(name: str, versions: list[int]) -> str:
    """A RepositoryModelLoad `config` override for dense with a specific version policy."""
    return json.dumps(
        {
            "name": name,
            "platform": "onnxruntime_onnx",
            "max_batch_size": 8,
            "version_policy": {"specific": {"versions": sorted(versions)}},
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [256]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [10]}],
        }
    )


def dense_input(seed: int = 0, batch: int = 1) -> np.ndarray:
    """Non-zero inputs (the failing version fails on anything but zeros)."""
    return np.random.default_rng(seed).uniform(0.1, 1.0, (batch, 256)).astype(np.float32)


def dense_request(
    model: str = "dense",
    version: str = "",
    parameters: Mapping[str, str] | None = None,
    x: np.ndarray | None = None,
) -> pb.ModelInferRequest:
    arr = dense_input() if x is None else x
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name="INPUT0", datatype="FP32", shape=list(arr.shape))
    req.raw_input_contents.append(arr.tobytes())
    for key, value in (parameters or {}).items():
        req.parameters[key].string_param = value
    return req


def write_corrupt_version(model: Path, version: int) -> None:
    d = model / str(version)
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(b"\x08\x07not an onnx model\xff" * 64)


def _save_dense_like(
    model: Path,
    version: int,
    name: str,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
) -> None:
    """`model/version/model.onnx`: a graph with dense's signature (INPUT0 [batch, 256] ->
    OUTPUT0 [batch, 10])."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(m)
    d = model / str(version)
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(d / "model.onnx"))


def write_failing_version(model: Path, version: int) -> None:
    """dense's signature; loads and warms up (zeros) fine, then fails at run time (onnxruntime
    FAIL, so the front answers INTERNAL and the canary guard counts it) on any input that is not
    all zeros: n = int(sum|x| * 1000), and the output is reshaped to [-1, 10 (n + 1)], which
    a batch of at most 8 rows cannot fill once n > 7."""

    def const(name: str, values: list[Any], dtype: Any) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, dtype=dtype), name)

    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.uniform(-0.1, 0.1, (256, 10)).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["INPUT0", "W"], ["mm"]),
        helper.make_node("Abs", ["INPUT0"], ["abs"]),
        helper.make_node("ReduceSum", ["abs"], ["sum2d"], keepdims=1),
        helper.make_node("Reshape", ["sum2d", "one"], ["sum"]),
        helper.make_node("Mul", ["sum", "k"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["n"], to=TensorProto.INT64),
        helper.make_node("Add", ["n", "one"], ["n1"]),
        helper.make_node("Mul", ["n1", "ten"], ["width"]),
        helper.make_node("Concat", ["minus1", "width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["mm", "shape"], ["wide"]),
        helper.make_node("Reshape", ["wide", "rows10"], ["OUTPUT0"]),
    ]
    inits = [
        w,
        const("one", [1], np.int64),
        const("ten", [10], np.int64),
        const("minus1", [-1], np.int64),
        const("rows10", [-1, 10], np.int64),
        const("k", [1000.0], np.float32),
    ]
    _save_dense_like(model, version, "failing_dense", nodes, inits)


def write_rejecting_version(model: Path, version: int) -> None:
    """dense's signature; loads and warms up (zeros) fine, then onnxruntime refuses any input
    that is not all zeros as it runs (INVALID_ARGUMENT: a Gather index out of range, the index
    being int(sum|x| * 1000) into a table of one value)."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.uniform(-0.1, 0.1, (256, 10)).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["INPUT0", "W"], ["mm"]),
        helper.make_node("Abs", ["INPUT0"], ["abs"]),
        helper.make_node("ReduceSum", ["abs"], ["sum"], keepdims=0),
        helper.make_node("Mul", ["sum", "k"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["picked"], axis=0),
        helper.make_node("Add", ["mm", "picked"], ["OUTPUT0"]),
    ]
    inits = [
        w,
        numpy_helper.from_array(np.array([1000.0], np.float32), "k"),
        numpy_helper.from_array(np.array([0.0], np.float32), "table"),
    ]
    _save_dense_like(model, version, "rejecting_dense", nodes, inits)


def write_golden(model: Path, version: int, x: np.ndarray, out: np.ndarray) -> None:
    """`<model>/<version>/golden.json` for dense: input x [1, 256] -> output out [1, 10]."""
    doc = {
        "inputs": {
            "INPUT0": {"datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        },
        "outputs": {"OUTPUT0": {"data": out.ravel().tolist(), "atol": 1e-5}},
    }
    (model / str(version) / "golden.json").write_text(json.dumps(doc))
