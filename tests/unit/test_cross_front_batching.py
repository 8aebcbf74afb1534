"""Calls from different front processes batch together (the fast-runtime issue, item 1).

A real worker serves its Unix socket; two fronts, each with its own arena and its own
RuntimeClient (what two `--frontends` processes have), send one call each to the demo's
`dense` loaded with dynamic batching that waits for 2 rows (preferred batch size 2) or a
minute. Both answers must come back from ONE execution of 2 rows, counted once, each with its
own rows of the result (checked against onnxruntime run in process). A worker that kept each
front's calls apart would answer only after the minute, with 1-row executions.

Both serving paths: a plain session's batcher, and the CUDA-graph path run on the CPU EP
(cpu_graphs: the same GraphSet, staging, padding and split as on a GPU). Also: a version stays
loaded while any front that loaded it still holds it.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import onnxruntime as ort

from runtime.client import CallFailed, InferResult, PreparedInput, RuntimeClient
from runtime.ipc.protocol import Batching, Code, LoadModel, ModelSignature
from runtime.ipc.shm import Arena, SlotPool
from runtime.worker import Worker
from server.settings import DEMO_REPOSITORY

MODEL = DEMO_REPOSITORY / "dense" / "1" / "model.onnx"
SLOT = 64 << 10
SLOTS = 8
WAIT_FOR_TWO = Batching(max_queue_delay_us=60_000_000, preferred=(2,))


async def _front(worker: Worker, front_id: int) -> RuntimeClient:
    arena = Arena(f"/microtune-test-{os.getpid()}-xfront-{front_id}", SLOT * SLOTS, create=True)
    client = RuntimeClient(worker.settings.socket_path, arena, SlotPool(SLOT, SLOTS), front_id)
    await client.connect()
    return client


async def _infer(client: RuntimeClient, rows: np.ndarray) -> InferResult:
    tensor = PreparedInput("INPUT0", "FP32", rows.shape, rows.tobytes())
    return await client.infer("dense", 1, [tensor], ["OUTPUT0"], 4096, time.monotonic() + 20)


def test_two_fronts_calls_run_in_one_execution(worker: Worker) -> None:
    done = worker.load(
        LoadModel(1, "dense", 1, str(MODEL), 8, ModelSignature((), ()), batching=WAIT_FOR_TWO)
    )
    assert done.code == Code.OK, done.message
    rng = np.random.default_rng(7)
    x_a = rng.standard_normal((1, 256), dtype=np.float32)
    x_b = rng.standard_normal((1, 256), dtype=np.float32)

    async def scenario() -> tuple[InferResult, InferResult]:
        a, b = await _front(worker, 1), await _front(worker, 2)
        try:
            ra, rb = await asyncio.gather(_infer(a, x_a), _infer(b, x_b))
        finally:
            for client in (a, b):
                await client.close()
                client.arena.close()
                client.arena.unlink()
        return ra, rb

    started = time.monotonic()
    ra, rb = asyncio.run(scenario())
    assert time.monotonic() - started < 30, "the calls waited out the queue delay: no batch"

    reference = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    for result, x in ((ra, x_a), (rb, x_b)):
        (out,) = result.outputs
        assert (out.name, out.shape) == ("OUTPUT0", (1, 10))
        got = np.frombuffer(out.data, dtype=np.float32).reshape(1, 10)
        (want,) = reference.run(["OUTPUT0"], {"INPUT0": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert result.timings.batch_size == 2  # the execution's rows: both fronts' calls
    assert ra.timings.executions + rb.timings.executions == 1  # one execution, counted once


def test_a_version_stays_loaded_while_another_front_holds_it(worker: Worker) -> None:
    """Fronts drain and unload on their own schedules (a repository poll, a hot swap): the
    worker unloads a version only when the last front that loaded it unloads it, and a front
    that disconnects lets go of what it held."""
    load = LoadModel(1, "dense", 1, str(MODEL), 8, ModelSignature((), ()))
    x = np.zeros((1, 256), dtype=np.float32)

    async def not_loaded(client: RuntimeClient) -> bool:
        try:
            await _infer(client, x)
        except CallFailed as exc:
            assert exc.code == Code.NOT_LOADED, exc.message
            return True
        return False

    async def scenario() -> None:
        a, b, c = await _front(worker, 5), await _front(worker, 6), await _front(worker, 7)
        try:
            for client in (a, b, c):
                assert (await client.load(load)).code == Code.OK
            await a.unload("dense", 1)
            assert not await not_loaded(b)  # b and c still hold it
            await c.close()  # c's front is gone: it holds nothing any more
            deadline = time.monotonic() + 10
            while worker.holders("dense", 1) > 1:  # (the worker sees the disconnect)
                assert time.monotonic() < deadline, "the worker kept c's hold"
                await asyncio.sleep(0.01)
            await b.unload("dense", 1)  # the last holder
            assert await not_loaded(a)
        finally:
            for client in (a, b, c):
                await client.close()
                client.arena.close()
                client.arena.unlink()

    asyncio.run(scenario())
