"""`spin`: a model whose run takes as long as a test asks. It loops N times over a small
matmul, N being an input; `spin_repository` writes it into a repository and finds, in
process, the N that takes about the seconds asked for here."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2 as pb


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


def spin_repository(repo: Path, seconds: float) -> int:
    """Write `spin` into `repo`; the N that takes about `seconds` here."""
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
    return int(n * seconds / (time.perf_counter() - start))


def spin_request(n: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="spin")
    req.inputs.add(name="N", datatype="INT64", shape=[1])
    req.inputs.add(name="X", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.extend([np.array([n], np.int64).tobytes(), b"\0" * 256])
    return req
