"""Stopping the server drains what it accepted: on SIGTERM the requests in flight are answered
for up to --shutdown-grace-s (30 s by default, as Triton's --exit-timeout-secs; it was a fixed
5 s, while the Helm chart gives a pod 60), with one front or several, and also when the signal
goes to the whole process group (systemd, Ctrl-C, `kill -- -PGID`): the runtime worker got it
too and died at once, failing every request still running.

`spin` loops N times over a small matmul (N is an input), so a request takes as long as the
test asks; N is calibrated here, in process, for about SLOW_S seconds."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from harness import Server
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

SLOW_S = 7.0  # longer than the old fixed 5 s


def spin_model() -> onnx.ModelProto:
    """Y = X after N[0] rounds of X <- tanh(X @ W)."""
    w = numpy_helper.from_array(np.eye(64, dtype=np.float32) * 0.5, "W")
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_in", "W"], ["m"]),
            helper.make_node("Tanh", ["m"], ["x_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "round",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 64]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 64]),
        ],
        [w],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["N", "scalar"], ["n"]),
            helper.make_node("Loop", ["n", "true", "X"], ["Y"], body=body),
        ],
        "spin",
        [
            helper.make_tensor_value_info("N", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 64])],
        [
            numpy_helper.from_array(np.array([], np.int64), "scalar"),
            numpy_helper.from_array(np.array(True), "true"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def spin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The repository, and the N that takes about SLOW_S seconds here."""
    repo = tmp_path_factory.mktemp("repo")
    model = spin_model()
    (repo / "spin" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "spin" / "1" / "model.onnx"))
    (repo / "spin" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "N" data_type: TYPE_INT64 dims: [ 1 ] },\n'
        '        { name: "X" data_type: TYPE_FP32 dims: [ 1, 64 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1, 64 ] } ]\n'
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    n = 200_000
    start = time.perf_counter()
    session.run(None, {"N": np.array([n], np.int64), "X": np.ones((1, 64), np.float32)})
    return repo, int(n * SLOW_S / (time.perf_counter() - start))


def request(n: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="spin")
    req.inputs.add(name="N", datatype="INT64", shape=[1])
    req.inputs.add(name="X", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.extend([np.array([n], np.int64).tobytes(), b"\0" * 256])
    return req


def drain(server: Server, n: int, stop: object) -> None:
    """Two slow requests in flight, then `stop()`: both answered, and a clean exit."""
    with grpc.insecure_channel(server.url) as ch, cf.ThreadPoolExecutor(2) as pool:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        calls = [pool.submit(stub.ModelInfer, request(n), timeout=120) for _ in range(2)]
        time.sleep(1.0)  # both running
        assert not any(c.done() for c in calls), [c.exception() for c in calls if c.done()]
        start = time.monotonic()
        stop()  # type: ignore[operator]
        for c in calls:
            assert c.result().model_name == "spin"  # answered, not cancelled
        assert time.monotonic() - start > 2.0  # (they were still running at the signal)
    assert server.proc.wait(60) == 0, server.log()[-3000:]


@pytest.mark.parametrize("frontends", [1, 2])
def test_sigterm_answers_the_requests_in_flight(
    spin: tuple[Path, int], tmp_path: Path, frontends: int
) -> None:
    repo, n = spin
    args = ("--shutdown-grace-s", "60", "--frontends", str(frontends))
    server = Server(repo, tmp_path, extra_args=args, kill_after=90)
    try:
        drain(server, n, lambda: server.proc.send_signal(signal.SIGTERM))
    finally:
        server.stop(check=False)


def test_a_signal_to_the_whole_process_group_drains_too(
    spin: tuple[Path, int], tmp_path: Path
) -> None:
    """Ctrl-C in a terminal: SIGINT to the group (the worker also printed a traceback)."""
    repo, n = spin
    args = ("--shutdown-grace-s", "60", "--frontends", "1")
    server = Server(repo, tmp_path, extra_args=args, kill_after=90, new_session=True)
    try:
        drain(server, n, lambda: os.killpg(server.proc.pid, signal.SIGINT))
        assert "Traceback" not in server.log(), server.log()[-3000:]
    finally:
        server.stop(check=False)
