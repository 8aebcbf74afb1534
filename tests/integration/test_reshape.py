"""Triton's `reshape` in a model config: clients see the config's `dims`, the graph has the
reshape's shape. A model whose graph takes X [batch] and gives Y [batch, 6] is served with
config dims X [1] (reshape []) and Y [2, 3] (reshape [6]), as a Triton repository declares it,
on plain sessions and on the GPU worker's path run on the CPU EP (`--cpu-graphs`, batched),
with tritonclient. The config was parsed and the reshape ignored: the model did not load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from harness import IR_VERSION, OPSET, Server, running_server
from onnx import TensorProto, helper, numpy_helper

CONFIG = """name: "reshaped"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] reshape { shape: [ ] } } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape { shape: [ 6 ] } } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
"""


def build(root: Path) -> Path:
    """Y[b, j] = X[b] * (j + 1): a graph that takes [batch] and gives [batch, 6]."""
    w = numpy_helper.from_array(np.arange(1, 7, dtype=np.float32).reshape(1, 6), "W")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "AXES")
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["X", "AXES"], ["X2"]),
            helper.make_node("MatMul", ["X2", "W"], ["Y"]),
        ],
        "reshaped",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 6])],
        [w, axes],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    (root / "reshaped" / "1").mkdir(parents=True)
    onnx.save(model, root / "reshaped" / "1" / "model.onnx")
    (root / "reshaped" / "config.pbtxt").write_text(CONFIG)
    return root


@pytest.fixture(scope="module", params=["sessions", "cpu-graphs"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = build(tmp_path_factory.mktemp("reshape") / "models")
    extra = ("--cpu-graphs", "true") if request.param == "cpu-graphs" else ()
    with running_server(root, tmp_path_factory.mktemp("reshape-server"), extra) as s:
        yield s


def test_clients_see_the_configs_dims(server: Server) -> None:
    with grpcclient.InferenceServerClient(server.url) as c:
        x = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)  # [3, 1], as the config says
        inp = grpcclient.InferInput("X", [3, 1], "FP32")
        inp.set_data_from_numpy(x)
        res = c.infer("reshaped", [inp])
        y = res.as_numpy("Y")
        assert y.shape == (3, 2, 3)
        want = (x * np.arange(1, 7, dtype=np.float32)).reshape(3, 2, 3)
        np.testing.assert_array_equal(y, want)
        meta = c.get_model_metadata("reshaped", as_json=True)
        assert [i["shape"] for i in meta["inputs"]] == [["-1", "1"]]
        assert [o["shape"] for o in meta["outputs"]] == [["-1", "2", "3"]]
        cfg = c.get_model_config("reshaped", as_json=True)["config"]
        assert cfg["input"][0]["dims"] == ["1"] and cfg["input"][0]["reshape"] == {}
        assert cfg["output"][0]["dims"] == ["2", "3"]
        assert cfg["output"][0]["reshape"] == {"shape": ["6"]}
