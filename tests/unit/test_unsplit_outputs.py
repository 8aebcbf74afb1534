"""A batch whose output's first dimension is not the batch dimension is not cut by rows.

`nonzero` is Transpose(NonZero(X)): X is [rows, width], Y is [k, 2], one row per non-zero
element of X, so k follows the data, not the batch. Loaded with max_batch_size and dynamic batching,
its batches were cut as if Y had one row per input row: each call got rows of the batch's Y,
other calls' among them (one client got another client's data). Now such a batch runs each
call alone (each gets all of its own Y, as without batching) and the version batches no more.

A real worker on both serving paths (the conftest's `worker`: a plain session's batcher, and
the CUDA-graph path on the CPU EP, where this model runs eagerly: its input's width varies,
so no graph is captured), with calls from a real front's RuntimeClient.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtime.client import InferResult, PreparedInput, RuntimeClient
from runtime.engine.graph_batch import UnsplitOutput, per_request
from runtime.engine.model import LoadedModel
from runtime.ipc.protocol import Batching, Code, LoadModel, ModelSignature
from runtime.ipc.shm import Arena, SlotPool
from runtime.worker import Worker

SLOT = 64 << 10
SLOTS = 8
ROWS = (1, 2, 1)  # one batch of 4 rows: the batcher releases it as soon as all have come
BATCHING = Batching(max_queue_delay_us=60_000_000, preferred=(sum(ROWS),))


def nonzero_model(path: Path) -> str:
    graph = helper.make_graph(
        [
            helper.make_node("NonZero", ["X"], ["nz"]),
            helper.make_node("Transpose", ["nz"], ["Y"], perm=[1, 0]),
        ],
        "nonzero",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", "width"])],
        [helper.make_tensor_value_info("Y", TensorProto.INT64, ["k", "rank"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


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


async def _rounds(worker: Worker, rounds: list[list[np.ndarray]]) -> list[list[InferResult]]:
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
                    "nonzero",
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
