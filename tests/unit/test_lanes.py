"""A plain version's calls that run neither inline nor batched run on a lane of threads of the
version's own (runtime.lanes), as each Triton model instance has its own thread: they queue
only behind that version's calls. They all went to one FIFO pool of the worker, where one
model's slow calls held every thread and other models' calls waited behind them, past their
deadlines.

A real worker serves a real front's RuntimeClient. A lane's threads are held busy here by a
task submitted to it, which stands for a slow call of the version.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.client import CallFailed, InferResult, PreparedInput, RuntimeClient
from runtime.ipc.protocol import Batching, Code, LoadModel, ModelSignature, UnloadModel
from runtime.lanes import Lane
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from tests.unit.test_direct_channels import MODEL, assert_dense, front, output
from tests.unit.worker_thread import serving_worker

X = np.ones((1, 256), dtype=np.float32)
X2 = np.ones((2, 256), dtype=np.float32)
# Another model file of the same signature (the demo's version 2: other weights), for reloads
# whose instance must be told from the one before.
OTHER = MODEL.parents[1] / "2" / "model.onnx"


def load(
    version: int = 1,
    instances: int = 0,
    revision: str = "",
    request_id: int = 1,
    batching: Batching | None = None,
    path: Path = MODEL,
) -> LoadModel:
    return LoadModel(
        request_id,
        "dense",
        version,
        str(path),
        8,
        ModelSignature((), ()),
        revision=revision,
        batching=batching,
        instances=instances,
    )


async def infer(client: RuntimeClient, version: int = 1, x: np.ndarray = X) -> InferResult:
    tensor = PreparedInput("INPUT0", "FP32", x.shape, x.tobytes())
    return await client.infer("dense", version, [tensor], ["OUTPUT0"], 8192, time.monotonic() + 20)


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    """One thread per lane by default (exec_threads 1, as --worker-threads 1)."""
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu", exec_threads=1)
    with serving_worker(settings) as w:
        yield w


def hold(lane: Lane, threads: int = 1) -> threading.Event:
    """Keep `threads` of the lane's threads busy until the event is set."""
    busy = threading.Event()
    for _ in range(threads):
        assert lane.submit(busy.wait, 30)
    return busy


def queued_on_lane(worker: Worker, calls: int = 1) -> bool:
    """Whether `calls` calls of the fronts wait for a lane thread (the worker read them)."""
    return sum(len(conn._alone) for conn in list(worker.connections.values())) >= calls


def test_a_call_waits_only_for_its_own_versions_lane(worker: Worker) -> None:
    """Version 1's one thread is busy (a slow call); version 2's first call (its timing
    unknown, so never inline) is answered meanwhile. With one pool for the worker it waited
    until version 1's call was done."""
    assert worker.load(load(1)).code == Code.OK
    assert worker.load(load(2)).code == Code.OK
    busy = hold(worker.lanes[("dense", 1)])

    async def scenario() -> None:
        async with front(worker, 1) as a:
            assert_dense(await asyncio.wait_for(infer(a, 2), 10), X)

    try:
        asyncio.run(scenario())
    finally:
        busy.set()


@pytest.mark.parametrize(
    ("load_msg", "threads"),
    [
        (load(instances=3), 3),  # instance_group counts, summed
        (load(), 1),  # none: the worker's exec_threads
        (load(instances=3, batching=Batching(instances=2)), 2),  # the batch instances
    ],
    ids=["instance-group", "default", "batching"],
)
def test_a_lane_has_the_versions_instance_count(
    worker: Worker, load_msg: LoadModel, threads: int
) -> None:
    assert worker.load(load_msg).code == Code.OK
    assert worker.lanes[("dense", 1)].threads == threads


def test_a_lane_runs_as_many_calls_at_once_as_the_version_has_instances(worker: Worker) -> None:
    """Two instances: with one thread of the lane busy, a call runs on the other; with both
    busy, it waits for one (a call of 2 rows: larger than any run yet, so never inline)."""
    assert worker.load(load(instances=2)).code == Code.OK
    lane = worker.lanes[("dense", 1)]

    async def scenario() -> None:
        async with front(worker, 1) as a:
            one = hold(lane)
            try:
                assert_dense(await asyncio.wait_for(infer(a), 10), X)
                two = hold(lane)
                try:
                    call = asyncio.create_task(infer(a, x=X2))
                    await until(lambda: queued_on_lane(worker), "the call never queued")
                    await asyncio.sleep(0.3)
                    assert not call.done()
                finally:
                    two.set()
                assert_dense(await asyncio.wait_for(call, 10), X2)
            finally:
                one.set()

    asyncio.run(scenario())


def test_a_reload_with_the_same_count_keeps_the_lane_and_its_queue(worker: Worker) -> None:
    """A reload in place (new revision, same instance count, another model file) keeps the
    lane: a call queued before it keeps its place, and runs once the lane has a thread, on
    the instance it was accepted for. It ran on the new one: an answer of the other file, or
    an onnxruntime error when the new file's outputs were not those it had been checked
    against. A call that comes after the reload runs on the new instance."""
    assert worker.load(load(revision="r1")).code == Code.OK
    lane = worker.lanes[("dense", 1)]
    before = worker.models[("dense", 1)]

    async def scenario() -> None:
        async with front(worker, 1) as a:
            busy = hold(lane)
            try:
                call = asyncio.create_task(infer(a))
                await until(lambda: queued_on_lane(worker), "the call never queued")
                msg = load(revision="r2", request_id=2, path=OTHER)
                done = await asyncio.to_thread(worker.load, msg)
                assert done.code == Code.OK and not done.reused, done.message
                assert worker.models[("dense", 1)] is not before
                assert worker.lanes[("dense", 1)] is lane
                later = asyncio.create_task(infer(a))
                await until(lambda: queued_on_lane(worker, 2), "the later call never queued")
            finally:
                busy.set()
            assert_dense(await asyncio.wait_for(call, 10), X)
            assert_other(await asyncio.wait_for(later, 10), X)

    asyncio.run(scenario())


def test_a_reload_with_another_count_gets_a_new_lane_and_the_old_one_drains(
    worker: Worker,
) -> None:
    """A reload that changes the instance count (1 -> 3) gives the version a lane of 3
    threads: new calls run there at once, on the new instance, although the old lane's thread
    is still busy. The call queued on the old lane still runs once that thread is free, on
    the instance it was accepted for; then the old lane's threads end."""
    assert worker.load(load(revision="r1")).code == Code.OK
    old = worker.lanes[("dense", 1)]

    async def scenario() -> None:
        async with front(worker, 1) as a:
            busy = hold(old)
            try:
                queued = asyncio.create_task(infer(a))
                await until(lambda: queued_on_lane(worker), "the call never queued")
                msg = load(instances=3, revision="r2", request_id=2, path=OTHER)
                assert (await asyncio.to_thread(worker.load, msg)).code == Code.OK
                new = worker.lanes[("dense", 1)]
                assert new is not old and new.threads == 3
                assert_other(await asyncio.wait_for(infer(a), 10), X)
                assert not queued.done()
            finally:
                busy.set()
            assert_dense(await asyncio.wait_for(queued, 10), X)
            threads = list(old._pool._threads)
            assert threads
            await until(
                lambda: not any(t.is_alive() for t in threads), "the old lane's threads stayed"
            )

    asyncio.run(scenario())


def test_an_unload_retires_the_lane(worker: Worker) -> None:
    """After an unload the version has no lane: a later call is answered NOT_LOADED at once.
    A call queued on it before still runs, on the instance it was accepted for, once it gets
    a thread (as a batched version's queued calls do)."""
    assert worker.load(load()).code == Code.OK
    lane = worker.lanes[("dense", 1)]

    async def scenario() -> None:
        async with front(worker, 1) as a:
            busy = hold(lane)
            try:
                queued = asyncio.create_task(infer(a))
                await until(lambda: queued_on_lane(worker), "the call never queued")
                await asyncio.to_thread(worker.unload, UnloadModel(3, "dense", 1))
                assert ("dense", 1) not in worker.lanes
                with pytest.raises(CallFailed) as later:
                    await asyncio.wait_for(infer(a), 10)  # no lane: answered at once
                assert later.value.code == Code.NOT_LOADED
                assert not queued.done()
            finally:
                busy.set()
            assert_dense(await asyncio.wait_for(queued, 10), X)

    asyncio.run(scenario())


def assert_other(result: InferResult, x: np.ndarray) -> None:
    """`result` is the OTHER file's answer for `x`, not MODEL's."""
    reference = ort.InferenceSession(str(OTHER), providers=["CPUExecutionProvider"])
    (want,) = reference.run(["OUTPUT0"], {"INPUT0": x})
    np.testing.assert_allclose(output(result), want, rtol=1e-5, atol=1e-6)
