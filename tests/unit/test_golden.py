"""The golden self-test (runtime/engine/golden.py, LoadedModel.load) and warm-up at every batch
size (LoadedModel.warm_up), on tiny ONNX models built here; the front's side (lifecycle: the
golden_path it sends) and the wire field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from runtime.engine.buckets import default_buckets  # noqa: E402
from runtime.engine.golden import GoldenMismatch  # noqa: E402
from runtime.engine.model import LoadedModel  # noqa: E402
from runtime.ipc.protocol import (  # noqa: E402
    GOLDEN_FILE,
    Code,
    LoadModel,
    ModelSignature,
    decode_front,
    encode,
)
from runtime.settings import WorkerSettings  # noqa: E402
from runtime.worker import Worker  # noqa: E402
from server.lifecycle import _golden  # noqa: E402

EMPTY = ModelSignature((), ())


def _model(nodes: list[Any], elem: int, dims: list[object], path: Path) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", elem, dims)],
        [helper.make_tensor_value_info("Y", elem, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))
    return path / "model.onnx"


@pytest.fixture()
def double(tmp_path: Path) -> Path:
    """Y = X + X, FP32 [batch, 4]."""
    return _model(
        [helper.make_node("Add", ["X", "X"], ["Y"])], TensorProto.FLOAT, ["b", 4], tmp_path / "1"
    )


@pytest.fixture()
def text(tmp_path: Path) -> Path:
    """Y = X, BYTES [batch, 2]."""
    return _model(
        [helper.make_node("Identity", ["X"], ["Y"])], TensorProto.STRING, ["b", 2], tmp_path / "2"
    )


def spec(path: Path, max_batch: int = 8, golden: str = "") -> LoadModel:
    return LoadModel(1, "m", 1, str(path), max_batch, EMPTY, golden_path=golden)


def write_golden(model: Path, doc: object) -> str:
    p = model.with_name(GOLDEN_FILE)
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


def fp32_golden(out: list[float], atol: float | None = None, **extra: object) -> dict[str, Any]:
    o: dict[str, Any] = {"data": out}
    if atol is not None:
        o["atol"] = atol
    return {
        "inputs": {"X": {"datatype": "FP32", "shape": [1, 4], "data": [0.5, 1.0, -2.0, 3.25]}},
        "outputs": {"Y": o},
        **extra,
    }


GOOD = [1.0, 2.0, -4.0, 6.5]


def failure(model: Path, doc: object, max_batch: int = 8) -> str:
    with pytest.raises(GoldenMismatch) as ei:
        LoadedModel.load(spec(model, max_batch, write_golden(model, doc)), "cpu")
    msg = str(ei.value)
    assert msg.startswith("golden self-test failed: "), msg
    return msg


# ----------------------------------------------------------------------------- matching


def test_matching_golden_loads(double: Path) -> None:
    m = LoadedModel.load(spec(double, golden=write_golden(double, fp32_golden(GOOD))), "cpu")
    assert m.spec is not None and m.spec.golden_path.endswith(GOLDEN_FILE)


def test_without_golden_nothing_is_checked(double: Path) -> None:
    write_golden(double, "not even json")  # present but not named: the front decides
    LoadedModel.load(spec(double), "cpu")


def test_within_atol_passes(double: Path) -> None:
    off = [v + 0.25 for v in GOOD]
    LoadedModel.load(spec(double, golden=write_golden(double, fp32_golden(off, 0.3))), "cpu")


def test_nan_matches_nan(tmp_path: Path) -> None:
    # Y = X / X: NaN for 0, 1 elsewhere.
    model = _model(
        [helper.make_node("Div", ["X", "X"], ["Y"])], TensorProto.FLOAT, ["b", 2], tmp_path / "3"
    )
    doc = {
        "inputs": {"X": {"datatype": "FP32", "shape": [1, 2], "data": [0.0, 2.0]}},
        "outputs": {"Y": {"data": ["NaN", 1.0]}},  # numpy reads "NaN" as a float
    }
    LoadedModel.load(spec(model, golden=write_golden(model, doc)), "cpu")
    doc["outputs"] = {"Y": {"data": [1.0, 1.0]}}
    assert failure(model, doc) == "golden self-test failed: output 'Y' differs by nan (atol 1e-05)"


def test_bytes_golden(text: Path) -> None:
    doc: dict[str, Any] = {
        "inputs": {"X": {"datatype": "BYTES", "shape": [1, 2], "data": ["héllo", ""]}},
        "outputs": {"Y": {"data": ["héllo", ""]}},
    }
    LoadedModel.load(spec(text, golden=write_golden(text, doc)), "cpu")
    doc["outputs"]["Y"]["data"] = ["héllo", "x"]
    assert failure(text, doc) == (
        "golden self-test failed: output 'Y' differs at element 1: '', expected 'x'"
    )


# ----------------------------------------------------------------------------- failing


def test_mismatch_names_output_difference_and_atol(double: Path) -> None:
    off = [*GOOD[:3], GOOD[3] + 0.5]
    assert failure(double, fp32_golden(off)) == (
        "golden self-test failed: output 'Y' differs by 0.5 (atol 1e-05)"
    )
    assert failure(double, fp32_golden(off, 0.1)) == (
        "golden self-test failed: output 'Y' differs by 0.5 (atol 0.1)"
    )


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["outputs"]["Y"].update(data=GOOD[:3]), "output 'Y' has 4 values, golden"),
        (lambda d: d["outputs"].update(Z={"data": [1]}), "the model has no output 'Z'"),
        (lambda d: d.update(outputs={}), 'needs at least one entry in "outputs"'),
        (lambda d: d["outputs"]["Y"].update(atol=-1), "atol must be a number >= 0"),
        (lambda d: d["outputs"]["Y"].update(data=["a", "b", "c", "d"]), "must be numbers"),
        (lambda d: d["inputs"].update(W=d["inputs"]["X"]), "do not match the model's ['X']"),
        (lambda d: d.update(inputs={}), "golden inputs [] do not match the model's ['X']"),
        (lambda d: d["inputs"]["X"].update(datatype="FP64"), "'FP64' in golden.json but FP32"),
        (lambda d: d["inputs"]["X"].update(shape=[2, 4]), "data has 4 values, shape [2, 4]"),
        (lambda d: d["inputs"]["X"].update(shape=[1, -4]), "shape must be a list of integers"),
        (lambda d: d["inputs"]["X"].update(data=["x"] * 4), "data is not FP32"),
    ],
    ids=[
        "output count",
        "unknown output",
        "no outputs",
        "bad atol",
        "text for numbers",
        "extra input",
        "missing input",
        "datatype",
        "shape vs data",
        "negative dim",
        "bad data",
    ],
)
def test_malformed_golden_fails_the_load(double: Path, mutate: Any, needle: str) -> None:
    doc = fp32_golden(GOOD)
    mutate(doc)
    msg = failure(double, doc)
    assert needle in msg, msg


def test_unreadable_golden(double: Path) -> None:
    msg = failure(double, "{not json")
    assert msg.startswith("golden self-test failed: cannot read golden.json: "), msg
    assert "must be an object" in failure(double, "[]")


def test_model_that_fails_on_the_golden_inputs(tmp_path: Path) -> None:
    # Reshape to [-1, 3]: fine for 3 or 6 elements, impossible for the golden's 4.
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [-1, 3])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "s"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "4").mkdir()
    path = tmp_path / "4" / "model.onnx"
    onnx.save(model, str(path))
    msg = failure(path, fp32_golden(GOOD), max_batch=0)
    assert msg.startswith("golden self-test failed: the model failed on the golden inputs: "), msg


def test_worker_reports_the_failure_as_the_load_reason(double: Path, tmp_path: Path) -> None:
    worker = Worker(WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu"))
    try:
        off = [*GOOD[:3], 7.0]
        done = worker.load(spec(double, golden=write_golden(double, fp32_golden(off))))
        assert done.code == Code.BAD_INPUT
        assert done.message == "golden self-test failed: output 'Y' differs by 0.5 (atol 1e-05)"
        assert ("m", 1) not in worker.models  # never routable
        ok = worker.load(spec(double, golden=write_golden(double, fp32_golden(GOOD))))
        assert ok.code == Code.OK and ("m", 1) in worker.models
    finally:
        worker.close_lanes()


# ----------------------------------------------------------------------------- front side


def test_front_sends_the_golden_beside_the_model_file(double: Path) -> None:
    assert _golden(str(double)) == ""
    path = write_golden(double, fp32_golden(GOOD))
    assert _golden(str(double)) == path == str(double.parent / "golden.json")


def test_golden_path_on_the_wire() -> None:
    msg = LoadModel(3, "m", 2, "/r/m/2/model.onnx", 8, EMPTY, golden_path="/r/m/2/golden.json")
    assert decode_front(encode(msg)[4:]) == msg
    # Without one, the frame is what it was before the field existed (omit_defaults).
    plain = LoadModel(3, "m", 2, "/r/m/2/model.onnx", 8, EMPTY)
    assert plain.golden_path == "" and b"golden" not in encode(plain)


# ----------------------------------------------------------------------------- warm-up


class Recorder:
    """Stands in for the session: records the batch size of each run."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.batches: list[int] = []

    def run(self, names: list[str], feeds: dict[str, Any]) -> Any:
        (arr,) = feeds.values()
        assert not np.any(arr)  # zeros
        self.batches.append(arr.shape[0])
        return self.real.run(names, feeds)


@pytest.mark.parametrize("max_batch", [1, 3, 8, 40])
def test_warm_up_runs_every_bucket(double: Path, max_batch: int) -> None:
    m = LoadedModel.load(spec(double, max_batch), "cpu")
    rec = Recorder(m.session)
    m.session = rec  # type: ignore[assignment]
    m.warm_up()
    assert rec.batches == list(default_buckets(max_batch))
    assert rec.batches[-1] == max_batch


def test_warm_up_without_batch_dimension_runs_once(tmp_path: Path) -> None:
    model = _model(
        [helper.make_node("Add", ["X", "X"], ["Y"])], TensorProto.FLOAT, [3, 4], tmp_path / "5"
    )
    m = LoadedModel.load(spec(model, 0), "cpu")
    rec = Recorder(m.session)
    m.session = rec  # type: ignore[assignment]
    m.warm_up()
    assert rec.batches == [3]


def test_warm_up_skips_text_and_unknown_dims(text: Path, tmp_path: Path) -> None:
    m = LoadedModel.load(spec(text, 8), "cpu")
    rec = Recorder(m.session)
    m.session = rec  # type: ignore[assignment]
    m.warm_up()
    assert rec.batches == []
    free = _model(
        [helper.make_node("Add", ["X", "X"], ["Y"])], TensorProto.FLOAT, ["b", "n"], tmp_path / "6"
    )
    m = LoadedModel.load(spec(free, 8), "cpu")
    rec = Recorder(m.session)
    m.session = rec  # type: ignore[assignment]
    m.warm_up()
    assert rec.batches == []
