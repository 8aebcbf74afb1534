"""A batch whose output's first dimension is not the batch dimension is not cut by rows.

`nonzero` is Transpose(NonZero(X)): X is [rows, width], Y is [k, 2], one row per non-zero
element of X, so k follows the data, not the batch. Loaded with max_batch_size and dynamic batching,
its batches were cut as if Y had one row per input row: each call got rows of the batch's Y,
other calls' among them (one client got another client's data). Now such a batch runs each
call alone (each gets all of its own Y, as without batching) and the version batches no more.

A real worker on both serving paths (the conftest's `worker`: a plain session's batcher, and
the CUDA-graph path on the CPU EP, where this model runs eagerly: its input's width varies,
so no graph is captured), with calls from a real front's RuntimeClient.

An output can also have as many rows as the batch by chance: `transpose` (X [B, L] -> T [L, B])
in a batch of L rows was cut as if T were batch-major, and each call got rows made of the
other calls' numbers. Nothing at run time can tell; the load runs the model at several batch
sizes on made-up inputs (runtime.engine.batch_probe), also where dims vary or inputs are text,
and such a version never batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtime.client import InferResult, PreparedInput, RuntimeClient
from runtime.engine.batch_probe import DIMS, probe_feeds
from runtime.engine.graph_batch import UnsplitOutput, per_request
from runtime.engine.model import LoadedModel
from runtime.ipc.protocol import Batching, Code, LoadModel, ModelSignature, TensorInfo
from runtime.ipc.shm import Arena, SlotPool
from runtime.worker import Worker

SLOT = 64 << 10
SLOTS = 8
ROWS = (1, 2, 1)  # one batch of 4 rows: the batcher releases it as soon as all have come
BATCHING = Batching(max_queue_delay_us=60_000_000, preferred=(sum(ROWS),))


def save(
    path: Path,
    nodes: list[onnx.NodeProto],
    x: onnx.ValueInfoProto,
    y: onnx.ValueInfoProto,
    *inits: onnx.TensorProto,
) -> str:
    """A model of input x and output y, saved to `path`."""
    graph = helper.make_graph(nodes, path.stem, [x], [y], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def nonzero_model(path: Path) -> str:
    return save(
        path,
        [
            helper.make_node("NonZero", ["X"], ["nz"]),
            helper.make_node("Transpose", ["nz"], ["Y"], perm=[1, 0]),
        ],
        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", "width"]),
        helper.make_tensor_value_info("Y", TensorProto.INT64, ["k", "rank"]),
    )


def transpose_model(path: Path, elem: int = TensorProto.FLOAT) -> str:
    """Y = X transposed: X [rows, length] -> Y [length, rows]."""
    return save(
        path,
        [helper.make_node("Transpose", ["X"], ["Y"], perm=[1, 0])],
        helper.make_tensor_value_info("X", elem, ["rows", "length"]),
        helper.make_tensor_value_info("Y", elem, ["length", "rows"]),
    )


def inputs(round_: int) -> list[np.ndarray]:
    """One array per call, each with a different number of non-zero elements per row."""
    xs = []
    for i, rows in enumerate(ROWS):
        x = np.zeros((rows, 4), np.float32)
        x[:, (i + round_) % 4] = 1
        if i % 2 == 0:
            x[0, :] = 2  # three more in its first row
        xs.append(x)
    return xs


async def _rounds(
    worker: Worker, rounds: list[list[np.ndarray]], model: str = "nonzero"
) -> list[list[InferResult]]:
    """Each round's calls sent at once from one front, the next round once they are answered."""
    arena = Arena(f"/microtune-test-{os.getpid()}-unsplit", SLOT * SLOTS, create=True)
    client = RuntimeClient(worker.settings.socket_path, arena, SlotPool(SLOT, SLOTS), 1)
    deadline = time.monotonic() + 30
    try:
        await client.connect()
        answers = []
        for xs in rounds:
            calls = [
                client.infer(
                    model,
                    1,
                    [PreparedInput("X", "FP32", x.shape, x.tobytes())],
                    ["Y"],
                    4096,
                    deadline,
                )
                for x in xs
            ]
            answers.append(list(await asyncio.gather(*calls)))
        return answers
    finally:
        await client.close()
        arena.close()
        arena.unlink()


def test_each_call_gets_its_own_rows_of_a_data_dependent_output(
    worker: Worker, tmp_path: Path
) -> None:
    path = nonzero_model(tmp_path / "model.onnx")
    spec = LoadModel(1, "nonzero", 1, path, 8, ModelSignature((), ()), batching=BATCHING)
    done = worker.load(spec)
    assert done.code == Code.OK, done.message
    rounds = [inputs(0), inputs(1)]  # the batch that shows it, then the next one
    for xs, results in zip(rounds, asyncio.run(_rounds(worker, rounds)), strict=True):
        for x, result in zip(xs, results, strict=True):
            (out,) = result.outputs
            got = np.frombuffer(out.data, np.int64).reshape(out.shape)
            np.testing.assert_array_equal(got, np.argwhere(x))
            assert result.timings.batch_size == len(x)  # it ran alone
    served = worker.graph_models.get(("nonzero", 1)) or worker.models[("nonzero", 1)]
    assert not served.splits_batches


def test_per_request_cuts_only_outputs_with_the_batchs_rows() -> None:
    y = np.arange(12).reshape(6, 2)  # a bucket of 6 rows
    first, second = per_request([y], [1, 3], 6, ["Y"])
    np.testing.assert_array_equal(first[0], y[:1])
    np.testing.assert_array_equal(second[0], y[1:4])
    with pytest.raises(UnsplitOutput, match=r"output 'Y' of a batch of 4 rows has shape \[6, 2\]"):
        per_request([y], [1, 3], 4, ["Y"])
    with pytest.raises(UnsplitOutput, match="output 'S'"):
        per_request([y[:4], np.float32(1)], [1, 3], 4, ["Y", "S"])
    # One request, not padded: all of it is its own, whatever the shape.
    (alone,) = per_request([y], [4], 4, ["Y"])
    assert alone[0] is y


def test_warm_up_finds_an_output_without_the_batch_rows(tmp_path: Path) -> None:
    """With fixed dims (X [rows, 4]) warm-up runs zeros at each batch size and sees Y's rows
    (none: zeros have no non-zero element) differ from the batch: the version never batches,
    so no batch whose rows happened to match is ever split wrongly before the first that
    does not. A model whose outputs have the batch's rows batches on."""
    graph = helper.make_graph(
        [
            helper.make_node("NonZero", ["X"], ["nz"]),
            helper.make_node("Transpose", ["nz"], ["Y"], perm=[1, 0]),
        ],
        "nonzero_fixed",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.INT64, ["k", "rank"])],
    )
    fixed = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fixed.ir_version = 8
    onnx.save(fixed, str(tmp_path / "nz.onnx"))
    spec = LoadModel(1, "nz", 1, str(tmp_path / "nz.onnx"), 8, ModelSignature((), ()))
    assert not LoadedModel.load(spec, "cpu").splits_batches

    identity = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "identity",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", 4])],
    )
    plain = helper.make_model(identity, opset_imports=[helper.make_opsetid("", 17)])
    plain.ir_version = 8
    onnx.save(plain, str(tmp_path / "id.onnx"))
    spec = LoadModel(1, "id", 1, str(tmp_path / "id.onnx"), 8, ModelSignature((), ()))
    assert LoadedModel.load(spec, "cpu").splits_batches


def test_an_output_with_the_batchs_rows_by_chance_is_never_cut(
    worker: Worker, tmp_path: Path
) -> None:
    """Calls of 1 and 2 rows, both of length 3: their batch has 3 rows, and so has its T. Each
    call gets its own transpose, computed alone: the load found that T does not follow the
    batch (its length, not its rows, was the first dimension at every batch size tried)."""
    path = transpose_model(tmp_path / "model.onnx")
    batching = Batching(max_queue_delay_us=60_000_000, preferred=(3,))
    spec = LoadModel(1, "transpose", 1, path, 8, ModelSignature((), ()), batching=batching)
    done = worker.load(spec)
    assert done.code == Code.OK, done.message
    xs = [np.array([[1, 2, 3]], np.float32), np.array([[10, 20, 30], [40, 50, 60]], np.float32)]
    (results,) = asyncio.run(_rounds(worker, [xs], "transpose"))
    for x, result in zip(xs, results, strict=True):
        (out,) = result.outputs
        np.testing.assert_array_equal(np.frombuffer(out.data, np.float32).reshape(out.shape), x.T)
        assert result.timings.batch_size == len(x)  # it ran alone
    served = worker.graph_models.get(("transpose", 1)) or worker.models[("transpose", 1)]
    assert not served.splits_batches  # as it was found at load, before any call


def test_probe_feeds_fill_what_the_signature_leaves_open() -> None:
    inputs = (
        TensorInfo("ids", "INT64", (-1, -1)),
        TensorInfo("text", "BYTES", (-1, 2)),
        TensorInfo("eight", "FP32", (8, 3)),
    )
    feeds = probe_feeds(inputs, 5)
    assert feeds["ids"].shape == (5, DIMS[0]) and feeds["ids"].dtype == np.int64
    assert not feeds["ids"].any()
    assert feeds["text"].shape == (5, 2) and (feeds["text"] == "0").all()
    assert feeds["eight"].shape == (8, 3)  # a fixed first dimension is what the graph takes
    unbatched = probe_feeds((TensorInfo("x", "FP16", (3, -1)),), None, 32)
    assert unbatched["x"].shape == (3, 32) and unbatched["x"].dtype == np.float16


def _loaded(path: str, batching: Batching | None = BATCHING) -> LoadedModel:
    spec = LoadModel(1, "m", 1, path, 8, ModelSignature((), ()), batching=batching)
    return LoadedModel.load(spec, "cpu")


def test_warm_up_checks_variable_dims_and_text(tmp_path: Path) -> None:
    """Inputs the signature leaves open are made up for the check (variable dims, text); a
    batch-major model batches on, whatever its dims and types."""
    assert not _loaded(transpose_model(tmp_path / "t.onnx")).splits_batches
    assert not _loaded(transpose_model(tmp_path / "s.onnx", TensorProto.STRING)).splits_batches
    assert not _loaded(nonzero_model(tmp_path / "nz.onnx")).splits_batches
    # Per-row results over a variable length, and text kept as it is: batch-major.
    row_sums = save(
        tmp_path / "sum.onnx",
        [helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=1)],
        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", "length"]),
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", 1]),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "axes"),
    )
    assert _loaded(row_sums).splits_batches
    text = save(
        tmp_path / "text.onnx",
        [helper.make_node("Identity", ["X"], ["Y"])],
        helper.make_tensor_value_info("X", TensorProto.STRING, ["rows", "length"]),
        helper.make_tensor_value_info("Y", TensorProto.STRING, ["rows", "length"]),
    )
    assert _loaded(text).splits_batches
    # Flattened to one value per row only when the length is 1: the check does not use 1.
    flat = save(
        tmp_path / "flat.onnx",
        [helper.make_node("Reshape", ["X", "shape"], ["Y"])],
        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", "length"]),
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n"]),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "shape"),
    )
    assert not _loaded(flat).splits_batches


def test_a_graph_with_a_fixed_first_dimension_loads_and_runs_alone(tmp_path: Path) -> None:
    """X [8, 4] with max_batch_size 8 (which the config check allows): the load feeds it the 8
    rows it takes, at every batch size, and its output does not follow the batch."""
    path = save(
        tmp_path / "eight.onnx",
        [helper.make_node("Identity", ["X"], ["Y"])],
        helper.make_tensor_value_info("X", TensorProto.FLOAT, [8, 4]),
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, [8, 4]),
    )
    assert not _loaded(path).splits_batches


def test_a_size_the_model_refuses_is_tried_with_the_next(tmp_path: Path) -> None:
    """[rows, length] -> [rows, length / 32, 32]: a length of 7 is refused, 32 runs."""
    path = save(
        tmp_path / "strided.onnx",
        [helper.make_node("Reshape", ["X", "shape"], ["Y"])],
        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", "length"]),
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", "blocks", 32]),
        onnx.numpy_helper.from_array(np.array([0, -1, 32], np.int64), "shape"),
    )
    assert DIMS[:2] == (7, 32)
    assert _loaded(path).splits_batches


def refusing_model(path: Path) -> str:
    """X [rows, length] times a [5, 2] matrix: only a length of 5 runs, which the load cannot
    guess."""
    assert 5 not in DIMS
    return save(
        path,
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", "length"]),
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", 2]),
        onnx.numpy_helper.from_array(np.ones((5, 2), np.float32), "W"),
    )


def test_a_model_that_refuses_made_up_inputs_runs_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The load cannot check its outputs, so the version does not batch, and says why."""
    path = refusing_model(tmp_path / "mm.onnx")
    with caplog.at_level(logging.WARNING, logger="runtime.engine.model"):
        assert not _loaded(path).splits_batches
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "model 'm' version 1: whether each output's first dimension follows the batch could "
        "not be checked at load: the model refused made-up inputs (zeros, text '0', variable "
        "dimensions of 7, 32, 1; first: "
    )
    assert "declare its inputs' dims in its config" in record.getMessage()
    # Its dims declared (config dims [5]), the load checks them, and it batches.
    declared = ModelSignature((TensorInfo("X", "FP32", (5,)),), ())
    spec = LoadModel(1, "m", 1, path, 8, declared, batching=BATCHING)
    assert LoadedModel.load(spec, "cpu").splits_batches
    # Without dynamic batching there is nothing to check, and nothing is made up.
    caplog.clear()
    assert _loaded(path, batching=None).splits_batches
    assert caplog.records == []


def test_a_version_that_cannot_be_checked_does_not_batch_on_either_path(
    worker: Worker, tmp_path: Path
) -> None:
    """On the CUDA-graph path (here on the CPU EP) as on the plain one."""
    path = refusing_model(tmp_path / "mm.onnx")
    done = worker.load(LoadModel(1, "mm", 1, path, 8, ModelSignature((), ()), batching=BATCHING))
    assert done.code == Code.OK, done.message
    served = worker.graph_models.get(("mm", 1)) or worker.models[("mm", 1)]
    assert not served.splits_batches
