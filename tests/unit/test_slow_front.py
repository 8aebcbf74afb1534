"""A front that stops reading its answers does not hold up the other fronts.

A version's batching thread answers every front's calls. Front a sends hundreds of calls and
then its event loop stops (busy, paused) before reading a single answer: its socket to the
worker fills after some 200 answers. Front b's call to the same version must still be
answered meanwhile, and once a reads again it gets every one of its answers, right, and the
worker's status for a counts the stalls of its socket (none for b). Both the
graph-set and the plain batcher paths, with a's calls on its link or on its direct channel.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runtime.client import InferResult
from runtime.ipc.protocol import Code
from runtime.worker import Worker
from tests.unit.test_direct_channels import assert_dense, expected, front, infer, load, output

CALLS = 600  # answers of about 200 bytes: several times what a Unix socket holds


@pytest.mark.parametrize("a_path", ["link", "channel"])
def test_a_front_that_stops_reading_does_not_hold_up_the_others(
    worker: Worker, a_path: str
) -> None:
    rng = np.random.default_rng(11)
    xs = rng.standard_normal((CALLS, 1, 256), dtype=np.float32)
    x_b = rng.standard_normal((1, 256), dtype=np.float32)
    sent = threading.Event()  # a's calls are out and its loop is about to stop
    resume = threading.Event()  # a's loop may go on
    a_results: list[InferResult] = []
    a_error: list[BaseException] = []
    a_stalls: list[int] = []

    async def front_a() -> None:
        async with front(worker, 1, slots=CALLS, slot_bytes=8192) as a:
            if a_path == "channel":
                assert (await a.load(load())).code == Code.OK
            calls = [asyncio.ensure_future(infer(a, x, deadline_s=60)) for x in xs]
            await asyncio.sleep(0)  # each call takes its slot and queues its frame
            await asyncio.sleep(0)  # the frames are written
            sent.set()
            resume.wait(60)  # the loop stops here: nothing is read from the worker
            a_results.extend(await asyncio.gather(*calls))
            assert a.direct_calls == (CALLS if a_path == "channel" else 0)
            # The worker counted a's full socket (the front's metrics export it).
            a_stalls.append((await a.status()).send_stalls)

    def run_a() -> None:
        try:
            asyncio.run(front_a())
        except BaseException as exc:  # reported on the test's thread
            a_error.append(exc)
            sent.set()

    async def front_b() -> InferResult:
        async with front(worker, 2) as b:
            assert (await b.load(load(2))).code == Code.OK
            result = await infer(b, x_b, deadline_s=10)
            assert (await b.status()).send_stalls == 0  # b read its answer: no stall of its own
            return result

    if a_path == "link":  # a never loads: its calls come through its link and the reader

        async def load_first() -> None:
            async with front(worker, 3) as c:
                assert (await c.load(load(3))).code == Code.OK

        asyncio.run(load_first())
    a_thread = threading.Thread(target=run_a)
    a_thread.start()
    try:
        assert sent.wait(60), "front a never sent its calls"
        assert not a_error, a_error
        time.sleep(0.3)  # the worker answers what it can: a's socket is full
        started = time.monotonic()
        result_b = asyncio.run(front_b())
        waited = time.monotonic() - started
    finally:
        resume.set()
        a_thread.join(60)
    assert not a_error, a_error
    assert_dense(result_b, x_b)
    assert waited < 10
    assert len(a_results) == CALLS
    assert a_stalls and a_stalls[0] >= 1
    want = expected(xs.reshape(CALLS, 256))
    got = np.concatenate([output(r) for r in a_results])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
