"""GraphModel: the worker's per-version CUDA-graph serving thread, run on the CPU EP
(GraphSet(device_type="cpu") accepts graph ids and ignores them), through an arena buffer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.engine.batcher import Batcher, Pending
from runtime.engine.buckets import BucketTable
from runtime.engine.graph_model import GraphModel, Queued
from runtime.engine.graphs import GraphSet
from runtime.engine.session import make_session, signature_of
from runtime.ipc.protocol import (
    Code,
    Infer,
    InferDone,
    LoadModel,
    ModelSignature,
    OutputRequest,
    TensorRef,
)

DENSE = Path(__file__).resolve().parents[2] / "server" / "demo_repository" / "dense" / "1"


def _spec() -> LoadModel:
    return LoadModel(1, "dense", 1, str(DENSE / "model.onnx"), 8, ModelSignature((), ()))


def _start(delay_us: int = 2000) -> GraphModel:
    def make() -> GraphSet:
        sess = make_session(str(DENSE / "model.onnx"), "cpu", 1)
        gs = GraphSet(sess, BucketTable((1, 2, 4, 8)), signature_of(sess), device_type="cpu")
        gs.capture()
        return gs

    batcher: Batcher[Queued] = Batcher(8, max_queue_delay_ns=delay_us * 1000)
    return GraphModel.start(_spec(), make, batcher)


def _call(buf: memoryview, call_id: int, rows: int, offset: int) -> tuple[Infer, np.ndarray]:
    x = np.random.default_rng(call_id).random((rows, 256), dtype=np.float32)
    buf[offset : offset + x.nbytes] = x.tobytes()
    ref = TensorRef("INPUT0", "FP32", (rows, 256), offset, x.nbytes)
    out_at = offset + 65536
    return Infer(call_id, "dense", 1, (ref,), (OutputRequest("OUTPUT0"),), out_at, 65536), x


def test_concurrent_calls_batch_pad_and_trim() -> None:
    sess = make_session(str(DENSE / "model.onnx"), "cpu", 1)
    model = _start()
    arena = memoryview(bytearray(16 * 131072))
    answers: dict[int, InferDone] = {}
    done = threading.Event()
    calls = [_call(arena, i, rows, i * 131072) for i, rows in enumerate((1, 2, 3), start=1)]

    def answer(d: InferDone) -> None:
        answers[d.call_id] = d
        if len(answers) == len(calls):
            done.set()

    now = time.monotonic_ns()
    for call, x in calls:
        model.submit(
            Pending(call.call_id, x.shape[0], now, payload=(answer, call, arena, now, None))
        )
    assert done.wait(10)
    model.close()
    executions = 0
    for call, x in calls:
        d = answers[call.call_id]
        assert d.code == Code.OK, d.message
        out = d.outputs[0]
        got = np.frombuffer(arena, np.float32, count=out.nbytes // 4, offset=out.offset)
        want = sess.run(["OUTPUT0"], {"INPUT0": x})[0]
        np.testing.assert_allclose(got.reshape(out.shape), want, rtol=1e-5, atol=1e-5)
        assert d.timings is not None and d.timings.batch_size == 6  # one execution, 6 rows
        assert d.timings.padded_batch == 8 and d.timings.mode == "replay"
        executions += d.timings.executions
    assert executions == 1


def test_expired_call_is_never_computed() -> None:
    model = _start(delay_us=50_000)
    arena = memoryview(bytearray(262144))
    got: list[InferDone] = []
    call, _ = _call(arena, 7, 1, 0)
    now = time.monotonic_ns()
    expired = Infer(
        call.call_id,
        call.name,
        call.version,
        call.inputs,
        call.outputs,
        call.out_offset,
        call.out_capacity,
        now - 1,
    )
    model.submit(Pending(7, 1, now, now - 1, payload=(got.append, expired, arena, now, None)))
    model.close()
    assert [d.code for d in got] == [Code.DEADLINE]


def test_a_model_that_fails_to_load_raises_from_start() -> None:
    def make() -> GraphSet:
        raise FileNotFoundError("no model")

    with pytest.raises(FileNotFoundError):
        GraphModel.start(_spec(), make, Batcher(8))
