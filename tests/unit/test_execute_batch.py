"""runtime.engine.model.execute_batch: a call the front should have refused (a shape no array
can have: no element, but a dimension of 2**62) fails alone, BAD_INPUT, and the calls batched
with it are answered. numpy's ValueError escaped as an unexpected error: the whole batch was
answered INTERNAL (the front now refuses such shapes too: server.rpc.codec). And the phase
times of a batch that runs as several groups."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from msgspec.structs import replace

from runtime.engine.model import LoadedModel, execute_batch
from runtime.ipc.protocol import Code, Infer, LoadModel, ModelSignature, OutputRequest, TensorRef

SIMPLE = Path(__file__).resolve().parents[2] / "server" / "demo_repository" / "simple" / "1"


def call(call_id: int, buf: memoryview, at: int, shape: tuple[int, ...]) -> Infer:
    x = np.full(shape, call_id, np.int32) if 0 not in shape else np.zeros(0, np.int32)
    buf[at : at + x.nbytes] = x.tobytes()
    refs = tuple(TensorRef(n, "INT32", shape, at, x.nbytes) for n in ("INPUT0", "INPUT1"))
    return Infer(call_id, "simple", 1, refs, (OutputRequest("OUTPUT0"),), at + 4096, 4096)


def test_a_call_no_array_can_hold_fails_alone() -> None:
    spec = LoadModel(1, "simple", 1, str(SIMPLE / "model.onnx"), 8, ModelSignature((), ()))
    model = LoadedModel.load(spec, "cpu")
    buf = memoryview(bytearray(4 * 8192))
    now = time.monotonic_ns()
    calls = [
        (call(1, buf, 0, (1, 16)), buf, now),
        (call(2, buf, 8192, (0, 1 << 62)), buf, now),
        (call(3, buf, 16384, (1, 16)), buf, now),
    ]
    answers = {d.call_id: d for d in execute_batch(model, calls)}
    assert answers[2].code == Code.BAD_INPUT
    assert answers[2].message.startswith("input 'INPUT0' with shape [0, 4611686018427387904]:")
    for good in (1, 3):
        assert answers[good].code == Code.OK, answers[good].message
        out = answers[good].outputs[0]
        got = np.frombuffer(buf, np.int32, out.nbytes // 4, out.offset)
        assert (got == 2 * good).all()


def test_a_later_group_waits_in_the_queue_not_in_its_input_phase() -> None:
    """Calls that ask for different outputs run as separate groups of one batch, one after
    the other. Each group's phases start when it starts: the later group's wait for the
    earlier one's run is queue time. (All groups took the batch's start: the later group's
    compute_input included the earlier group's whole run, its queue time was short by as
    much.)"""
    spec = LoadModel(1, "simple", 1, str(SIMPLE / "model.onnx"), 8, ModelSignature((), ()))
    model = LoadedModel.load(spec, "cpu")
    buf = memoryview(bytearray(4 * 8192))
    now = time.monotonic_ns()
    calls = []
    for k, output in enumerate(("OUTPUT0", "OUTPUT0", "OUTPUT1", "OUTPUT1")):
        c = replace(call(k + 1, buf, k * 8192, (2, 16)), outputs=(OutputRequest(output),))
        calls.append((c, buf, now))
    answers = {d.call_id: d for d in execute_batch(model, calls)}
    assert all(d.code == Code.OK for d in answers.values())
    first, later = answers[1].timings, answers[3].timings
    assert (first.batch_size, first.executions, later.batch_size, later.executions) == (4, 1, 4, 1)
    # Both measured from the same receipt: the later group started after the first ended.
    first_done = first.queue_ns + first.input_ns + first.infer_ns + first.output_ns
    assert later.queue_ns >= first_done
