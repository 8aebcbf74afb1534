"""The batch size the worker reports for an execution (Timings.batch_size: ModelStatistics'
batch_stats and `microtune_execution_batch_size`). A version without a batch dimension
(max_batch_size 0) runs each request as an execution of batch 1, as Triton's backends count
it, whatever its first input's first dimension: it reported that dimension (identity_fp32 with
inputs of shape [5] and [100]: batch sizes 5 and 100, so batch_size times count summed to 105 for 2
inferences, and each new length added a batch_stats entry)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from runtime.engine.model import LoadedModel
from runtime.ipc.protocol import Code, Infer, LoadModel, ModelSignature, OutputRequest, TensorRef

DEMO = Path(__file__).resolve().parents[2] / "server" / "demo_repository"


def load(name: str, max_batch_size: int) -> LoadedModel:
    path = str(DEMO / name / "1" / "model.onnx")
    spec = LoadModel(1, name, 1, path, max_batch_size, ModelSignature((), ()))
    return LoadedModel.load(spec, "cpu")


def infer(names: tuple[str, ...], x: np.ndarray, buf: memoryview) -> Infer:
    buf[: x.nbytes] = x.tobytes()
    datatype = "FP32" if x.dtype == np.float32 else "INT32"
    refs = tuple(TensorRef(n, datatype, x.shape, 0, x.nbytes) for n in names)
    return Infer(1, "m", 1, refs, (OutputRequest("OUTPUT0"),), 1 << 16, 1 << 16)


@pytest.mark.parametrize("length", [1, 5, 100])
def test_a_version_without_batch_dimension_runs_batches_of_one(length: int) -> None:
    model = load("identity_fp32", 0)
    buf = memoryview(bytearray(1 << 17))
    x = np.arange(length, dtype=np.float32)
    done = model.execute(infer(("INPUT0",), x, buf), buf, time.monotonic_ns())
    assert done.code == Code.OK, done.message
    assert done.timings.batch_size == 1


def test_a_batching_version_reports_its_rows() -> None:
    model = load("simple", 8)
    buf = memoryview(bytearray(1 << 17))
    x = np.ones((3, 16), np.int32)
    done = model.execute(infer(("INPUT0", "INPUT1"), x, buf), buf, time.monotonic_ns())
    assert done.code == Code.OK, done.message
    assert done.timings.batch_size == 3
