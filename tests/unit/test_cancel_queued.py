"""A call its front gives up while it waits in the worker (runtime.ipc.protocol.Cancel) is
dropped there: answered at once, so its arena lease is free again, its place in the queue is
free for the next call, and it is never computed. As Triton (r23.10+) drops cancelled requests
from its dynamic batcher's queue.

A real worker serves real fronts' RuntimeClients: the call waits in a batcher (a graph-served
version on the CPU EP, and a plain session's batcher) reached through the front's link or the
version's direct channel, or it waits for a thread of its version's lane (a version without
batching: runtime.lanes). An execution would reach the front as an orphan's answer with timings
(`on_orphan_execution`): none may come.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.engine.batcher import Batcher
from runtime.ipc.protocol import Batching, Code, LoadModel, ModelSignature, Timings
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from tests.unit.test_direct_channels import MODEL, front, infer
from tests.unit.worker_thread import serving_worker

KEY = ("dense", 1)
# Calls of 3 rows in all make a batch at once; fewer wait a minute: still queued when cancelled.
WAIT_FOR_THREE = Batching(max_queue_delay_us=60_000_000, preferred=(3,), max_queue_size=2)
X = np.ones((1, 256), dtype=np.float32)
X2 = np.ones((2, 256), dtype=np.float32)


def load(batching: Batching | None) -> LoadModel:
    return LoadModel(1, "dense", 1, str(MODEL), 8, ModelSignature((), ()), batching=batching)


def batcher_of(worker: Worker) -> Batcher[Any]:
    graph_model = worker.graph_models.get(KEY)
    return graph_model.batcher if graph_model is not None else worker.batchers[KEY]


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("route", ["link", "channel"])
def test_cancelled_calls_leave_the_batcher_at_once_and_never_run(
    worker: Worker, route: str
) -> None:
    """Two calls of a row wait for a third row (max_queue_size 2: the queue is full); their
    caller is cancelled. The worker answers both at once: the front's leases are back while
    the batch delay still has a minute to go, and two new calls (1 and 2 rows) find room,
    batch and run together, the cancelled ones left out."""

    async def scenario() -> None:
        async with front(worker, 1) as a:
            if route == "channel":  # the front's own load names the version's channel
                done = await a.load(load(WAIT_FOR_THREE))
            else:  # loaded for another front: this one's calls take its link
                done = worker.load(load(WAIT_FOR_THREE))
            assert done.code == Code.OK, done.message
            executed: list[Timings] = []
            a.on_orphan_execution = lambda name, version, t: executed.append(t)
            calls = [asyncio.create_task(infer(a, X)) for _ in range(2)]
            batcher = batcher_of(worker)
            await until(lambda: batcher.stats().queued == 2, "the calls never queued")
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await until(lambda: a.pool.in_use == 0, "the cancelled calls kept their leases")
            stats = batcher.stats()
            assert (stats.queued, stats.cancelled, stats.batches) == (0, 2, 0)
            ra, rb = await asyncio.gather(infer(a, X), infer(a, X2))
            assert ra.timings.batch_size == rb.timings.batch_size == 3
            assert batcher.stats().batched_requests == 2  # the new ones only
            assert executed == []
            assert a.direct_calls == (4 if route == "channel" else 0)

    asyncio.run(scenario())


def test_a_cancelled_call_waiting_for_a_lane_thread_never_runs(tmp_path: Path) -> None:
    """A version without batching runs each call on its lane; with the lane's one thread
    (exec_threads 1, no instance_group) busy, a call waits in its queue. Cancelled there, it is
    answered at once (its lease is back while the thread is still busy) and is not run once the
    thread is free."""
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu", exec_threads=1)
    with serving_worker(settings) as worker:
        assert worker.load(load(None)).code == Code.OK
        busy = threading.Event()
        assert worker.lanes[KEY].submit(busy.wait, 30)  # the lane's only thread

        async def scenario() -> None:
            async with front(worker, 1) as a:
                executed: list[Timings] = []
                a.on_orphan_execution = lambda name, version, t: executed.append(t)
                call = asyncio.create_task(infer(a, X))
                # Leased, so sent: the Cancel follows it on the link, read after it.
                await until(lambda: a.pool.in_use > 0, "the call was never sent")
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
                await until(lambda: a.pool.in_use == 0, "the cancelled call kept its lease")
                busy.set()
                # The lane runs in order: the cancelled call would have run before this one.
                result = await infer(a, X)
                assert result.timings.executions == 1
                assert executed == []
                (conn,) = worker.connections.values()
                assert not conn._alone  # nothing left behind for the call

        try:
            asyncio.run(scenario())
        finally:
            busy.set()
