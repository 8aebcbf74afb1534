"""One request's data fails only that request, not the others it was batched with, and no
request gets another's results.

`strings` is the demo's simple_string (its graph parses text as integers with a Cast, so
onnxruntime fails on other text) with dynamic batching and a long queue delay: requests sent
together run as one execution. When that execution fails, the worker runs each request alone,
so the good ones are answered with their sums and only the bad one gets the model's failure.

`transposed` (X [B, L] -> T [L, B], L variable) is batched by its config, but its output is not
batch-major: a batch of L rows was cut by rows between its requests, each getting other
requests' numbers. The load finds it (runtime.engine.batch_probe) and each request runs alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
from collections.abc import Iterator

import grpc
import numpy as np
import onnx
import pytest
from harness import DEMO, IR_VERSION, OPSET, Server, running_server
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

Code = grpc.StatusCode
DELAY_US = 300_000  # the batch waits this long for more requests: all of them join it


@pytest.fixture(scope="module")
def stub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    repo = tmp_path_factory.mktemp("isolation") / "models"
    (repo / "strings" / "1").mkdir(parents=True)
    shutil.copy(DEMO / "simple_string" / "1" / "model.onnx", repo / "strings" / "1")
    config = (DEMO / "simple_string" / "config.pbtxt").read_text()
    config = config.replace('"simple_string"', '"strings"')
    config += f"dynamic_batching {{ max_queue_delay_microseconds: {DELAY_US} }}\n"
    (repo / "strings" / "config.pbtxt").write_text(config)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["X"], ["T"], perm=[1, 0])],
        "transposed",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "length"])],
        [helper.make_tensor_value_info("T", TensorProto.FLOAT, ["length", "batch"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    (repo / "transposed" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "transposed" / "1" / "model.onnx"))
    (repo / "transposed" / "config.pbtxt").write_text(
        f"max_batch_size: 8\ndynamic_batching {{ max_queue_delay_microseconds: {DELAY_US} }}\n"
    )
    server: Server
    with (
        running_server(repo, repo.parent / "server") as server,
        grpc.insecure_channel(server.url) as channel,
    ):
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(a: list[str], b: list[str]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="strings")
    for name, values in (("INPUT0", a), ("INPUT1", b)):
        req.inputs.add(name=name, datatype="BYTES", shape=[1, 16])
        tensor = np.array([[v.encode() for v in values]], dtype=object)
        req.raw_input_contents.append(serialize_byte_tensor(tensor).item())
    return req


def sums(resp: pb.ModelInferResponse) -> list[int]:
    out = deserialize_bytes_tensor(resp.raw_output_contents[0])
    return [int(v) for v in out]


def executions(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str = "strings"
) -> dict[int, int]:
    """Successful executions per batch size."""
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return {b.batch_size: b.compute_infer.count for b in stats.model_stats[0].batch_stats}


def test_a_bad_request_fails_alone_and_its_batch_is_answered(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    good = [request([str(i + k) for k in range(16)], ["1"] * 16) for i in range(4)]
    bad = request(["1"] * 15 + ["not a number"], ["1"] * 16)
    with cf.ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(stub.ModelInfer, r, timeout=30) for r in (*good, bad)]
        cf.wait(futures)
    for i, fut in enumerate(futures[:4]):
        assert sums(fut.result()) == [i + k + 1 for k in range(16)]
    with pytest.raises(grpc.RpcError) as ei:
        futures[4].result()
    assert ei.value.code() == Code.INTERNAL
    assert "model 'strings' version 1 failed: " in (ei.value.details() or "")
    # They were one batch (five rows), which failed; then each ran alone.
    assert executions(stub) == {1: 4}, executions(stub)


def test_an_output_that_is_not_batch_major_is_never_cut_between_requests(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """1 row and 2 rows of length 3, sent together: one batch of 3 rows would give a T of
    3 rows too, which nothing at run time could tell from a batch-major output."""
    xs = [np.array([[1, 2, 3]], np.float32), np.array([[10, 20, 30], [40, 50, 60]], np.float32)]
    reqs = []
    for x in xs:
        req = pb.ModelInferRequest(model_name="transposed")
        req.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        reqs.append(req)
    with cf.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda r: stub.ModelInfer(r, timeout=30), reqs))
    for x, resp in zip(xs, answers, strict=True):
        out = resp.outputs[0]
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(out.shape))
        np.testing.assert_array_equal(got, x.T)
    assert executions(stub, "transposed") == {1: 1, 2: 1}  # each ran alone
