"""runtime.engine.reshape: Triton's config `reshape` served by rewriting the graph, on real
onnxruntime sessions (LoadedModel.load) over models built here with onnx.helper."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.engine.model import LoadedModel
from runtime.engine.reshape import ReshapeError, model_file
from runtime.ipc.protocol import (
    Code,
    Infer,
    LoadModel,
    ModelSignature,
    OutputRequest,
    TensorInfo,
    TensorRef,
)

OPSET, IR = 17, 8


def save(graph: onnx.GraphProto, path: Path) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return str(path)


def times_six(tmp_path: Path, out_dims: int = 6) -> str:
    """Y[b, j] = X[b] * (j + 1): X [batch], Y [batch, out_dims]."""
    w = numpy_helper.from_array(np.arange(1, out_dims + 1, dtype=np.float32).reshape(1, -1), "W")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "AXES")
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["X", "AXES"], ["X2"]),
            helper.make_node("MatMul", ["X2", "W"], ["Y"]),
        ],
        "m",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", out_dims])],
        [w, axes],
    )
    return save(graph, tmp_path / "m" / "1" / "model.onnx")


def spec(path: str, max_batch: int, ins: dict, outs: dict, reshapes: dict) -> LoadModel:
    sig = ModelSignature(
        tuple(TensorInfo(n, "FP32", d) for n, d in ins.items()),
        tuple(TensorInfo(n, "FP32", d) for n, d in outs.items()),
    )
    return LoadModel(1, "m", 1, path, max_batch, sig, reshapes=tuple(reshapes.items()))


def run(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    buf = memoryview(bytearray(1 << 16))
    buf[: x.nbytes] = x.tobytes()
    ref = TensorRef("X", "FP32", x.shape, 0, x.nbytes)
    call = Infer(1, "m", 1, (ref,), (OutputRequest("Y"),), 4096, 1 << 15)
    done = model.execute(call, buf, time.monotonic_ns())
    assert done.code == Code.OK, done.message
    out = done.outputs[0]
    return np.frombuffer(buf, np.float32, out.nbytes // 4, out.offset).reshape(out.shape)


def test_a_batched_model_is_served_in_the_configs_dims(tmp_path: Path) -> None:
    msg = spec(times_six(tmp_path), 8, {"X": (1,)}, {"Y": (2, 3)}, {"X": (), "Y": (6,)})
    with model_file(msg, str(tmp_path)) as path:
        model = LoadedModel.load(msg, "cpu", path)
        assert Path(path).parent == tmp_path  # in the worker's run directory ...
    assert not list(tmp_path.glob("reshaped-*"))  # ... and gone once loaded
    x = np.array([[1.0], [2.0]], dtype=np.float32)
    y = run(model, x)
    assert y.shape == (2, 2, 3)
    np.testing.assert_array_equal(y.reshape(2, 6), x * np.arange(1, 7, dtype=np.float32))


def test_a_model_without_batch_takes_a_scalar(tmp_path: Path) -> None:
    """dims [1] reshape [] with max_batch_size 0: the Reshape's target is an empty shape,
    which numpy made a float64 array (onnxruntime refused the model)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "X"], ["Y"])],
        "m",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [])],
    )
    path = save(graph, tmp_path / "m" / "1" / "model.onnx")
    msg = spec(path, 0, {"X": (1,)}, {"Y": (1,)}, {"X": (), "Y": ()})
    with model_file(msg, str(tmp_path)) as p:
        model = LoadedModel.load(msg, "cpu", p)
    y = run(model, np.array([3.0], dtype=np.float32))
    assert y.shape == (1,) and y[0] == 9.0


def test_a_reshape_that_is_not_the_graphs_shape_is_refused(tmp_path: Path) -> None:
    """The graph's Y is [batch, 12]; a config saying reshape [6] of dims [2, 3] loaded and
    answered with wrong shapes ([2, 2, 3] for one row)."""
    msg = spec(times_six(tmp_path, 12), 8, {"X": (1,)}, {"Y": (2, 3)}, {"X": (), "Y": (6,)})
    with pytest.raises(ReshapeError) as caught, model_file(msg, str(tmp_path)):
        pass
    assert str(caught.value) == (
        "'Y': reshape [6] does not fit the ONNX graph's shape [-1, 12] (batch dimension first)"
    )
    assert not list(tmp_path.glob("reshaped-*"))


def test_a_tensor_used_inside_a_subgraph_is_refused(tmp_path: Path) -> None:
    """An If branch reading X from the outer scope was left reading the clients' shape."""
    z = numpy_helper.from_array(np.ones(3, np.float32), "Z")
    branch = helper.make_graph(
        [helper.make_node("Add", ["X", "Z"], ["B"])],
        "b",
        [],
        [helper.make_tensor_value_info("B", TensorProto.FLOAT, [3])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["C"], ["Y"], then_branch=branch, else_branch=branch)],
        "m",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("C", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
        [z],
    )
    path = save(graph, tmp_path / "m" / "1" / "model.onnx")
    msg = spec(path, 0, {"X": (3, 1)}, {}, {"X": (3,)})
    refused = pytest.raises(ReshapeError, match="'X' is used inside a control-flow subgraph")
    with refused, model_file(msg, str(tmp_path)):
        pass


def test_a_constant_output_can_be_reshaped(tmp_path: Path) -> None:
    """An output no node produces (an initializer: a label table) was defined twice."""
    labels = numpy_helper.from_array(np.arange(6, dtype=np.float32), "Y")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["X_OUT"])],
        "m",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info("X_OUT", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [6]),
        ],
        [labels],
    )
    path = save(graph, tmp_path / "m" / "1" / "model.onnx")
    msg = spec(path, 0, {"X": (2,)}, {"Y": (2, 3)}, {"Y": (6,)})
    with model_file(msg, str(tmp_path)) as p:
        model = LoadedModel.load(msg, "cpu", p)
    y = run(model, np.array([1.0, 2.0], dtype=np.float32))
    np.testing.assert_array_equal(y, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_without_a_reshape_the_models_own_file_is_used(tmp_path: Path) -> None:
    path = times_six(tmp_path)
    msg = spec(path, 8, {}, {}, {})
    with model_file(msg, str(tmp_path)) as p:
        assert p == path
    assert os.path.exists(path)
