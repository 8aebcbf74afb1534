"""Direct channels (runtime.channels): a batched version's calls go from each front straight
to the thread that batches them, on a socket of the version's own.

A real worker serves real fronts' RuntimeClients, on both paths that have channels: a
version served from its graph set (`cpu_graphs`: the GPU worker's path on the CPU EP) and a
plain session's batcher with one instance. Checked here: a front that loads the version gets
its channel and its calls take it, and they still batch with calls that came through another
front's link; a reload keeps the channel and answers every call sent across it; an unload
closes it; a stranger on the socket is shut out without harming the version; a full queue and
the status of queued calls work on the channel as on the link; a batcher that cannot read a
channel has none.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.channels import ChannelTable
from runtime.client import CallFailed, InferResult, PreparedInput, RuntimeClient, WorkerGone
from runtime.ipc.protocol import Attach, Batching, Code, LoadModel, ModelSignature, encode
from runtime.ipc.shm import Arena, SlotPool
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from server.settings import DEMO_REPOSITORY
from tests.unit.worker_thread import serving_worker

MODEL = DEMO_REPOSITORY / "dense" / "1" / "model.onnx"
SLOT = 64 << 10
WAIT_FOR_TWO = Batching(max_queue_delay_us=60_000_000, preferred=(2,))


NO_DELAY = Batching()


def load(
    request_id: int = 1, batching: Batching | None = NO_DELAY, revision: str = ""
) -> LoadModel:
    return LoadModel(
        request_id,
        "dense",
        1,
        str(MODEL),
        8,
        ModelSignature((), ()),
        revision=revision,
        batching=batching,
    )


def instance(worker: Worker) -> object:
    """What serves dense version 1 now (a reload replaces it)."""
    return worker.graph_models.get(("dense", 1)) or worker.models[("dense", 1)]


@asynccontextmanager
async def front(
    worker: Worker, front_id: int, slots: int = 8, slot_bytes: int = SLOT
) -> AsyncIterator[RuntimeClient]:
    name = f"/microtune-test-{os.getpid()}-chan-{front_id}"
    arena = Arena(name, slot_bytes * slots, create=True)
    pool = SlotPool(slot_bytes, slots)
    client = RuntimeClient(worker.settings.socket_path, arena, pool, front_id)
    try:
        await client.connect()
        yield client
    finally:
        await client.close()
        arena.close()
        arena.unlink()


async def infer(client: RuntimeClient, x: np.ndarray, deadline_s: float = 20) -> InferResult:
    tensor = PreparedInput("INPUT0", "FP32", x.shape, x.tobytes())
    return await client.infer(
        "dense", 1, [tensor], ["OUTPUT0"], 4096, time.monotonic() + deadline_s
    )


@asynccontextmanager
async def traffic(
    client: RuntimeClient,
    cases: Sequence[tuple[np.ndarray, np.ndarray]],
    senders: int,
    rtol: float = 1e-5,
    atol: float = 0.0,
) -> AsyncIterator[Callable[[], int]]:
    """`senders` tasks calling `client` in a loop while the block runs, sender k with input
    and expected output `cases[k % len(cases)]`; a failed or wrong call raises when the block
    ends. Yields how many calls were answered so far."""
    stop = asyncio.Event()
    answered = 0

    async def send(x: np.ndarray, want: np.ndarray) -> None:
        nonlocal answered
        while not stop.is_set():
            np.testing.assert_allclose(output(await infer(client, x)), want, rtol=rtol, atol=atol)
            answered += 1

    tasks = [asyncio.create_task(send(*cases[k % len(cases)])) for k in range(senders)]
    try:
        yield lambda: answered
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def expected(x: np.ndarray) -> np.ndarray:
    reference = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (want,) = reference.run(["OUTPUT0"], {"INPUT0": x})
    return np.asarray(want)


def exists(path: str) -> bool:
    return Path(path).exists()


def output(result: InferResult) -> np.ndarray:
    (out,) = result.outputs
    return np.frombuffer(out.data, dtype=np.float32).reshape(out.shape)


def assert_dense(result: InferResult, x: np.ndarray) -> None:
    """`result` is what onnxruntime computes for `x` in this process."""
    np.testing.assert_allclose(output(result), expected(x), rtol=1e-5, atol=1e-6)


def test_a_front_that_loads_the_version_sends_on_its_channel_and_batches_with_the_link(
    worker: Worker,
) -> None:
    """Front a loads `dense` (batched, waiting for 2 rows): its LoadDone names a channel and
    its call goes there. Front b never loaded it, so its call comes through b's link and the
    reader. Both land in the one queue: one execution of 2 rows answers both."""
    rng = np.random.default_rng(3)
    x_a = rng.standard_normal((1, 256), dtype=np.float32)
    x_b = rng.standard_normal((1, 256), dtype=np.float32)

    async def scenario() -> tuple[InferResult, InferResult, str]:
        async with front(worker, 1) as a, front(worker, 2) as b:
            done = await a.load(load(batching=WAIT_FOR_TWO))
            assert done.code == Code.OK, done.message
            ra, rb = await asyncio.gather(infer(a, x_a), infer(b, x_b))
            assert (a.direct_calls, b.direct_calls) == (1, 0)
            return ra, rb, done.channel

    started = time.monotonic()
    ra, rb, channel = asyncio.run(scenario())
    assert time.monotonic() - started < 30, "the calls waited out the queue delay: no batch"
    assert channel.startswith(worker.settings.socket_path + ".")
    for result, x in ((ra, x_a), (rb, x_b)):
        assert_dense(result, x)
        assert result.timings.batch_size == 2
        assert result.timings.mode == ("replay" if worker.use_graphs else "eager")
    assert ra.timings.executions + rb.timings.executions == 1


def test_a_reload_keeps_the_channel_and_answers_every_call_sent_across_it(
    worker: Worker,
) -> None:
    """Calls keep flowing on the channel while the version is reloaded from new files (a new
    revision): the new instance takes the channel over, and no call fails or is lost."""
    x = np.ones((1, 256), dtype=np.float32)
    want = expected(x)

    async def scenario() -> tuple[int, int, str, str]:
        async with front(worker, 3) as a:
            first = await a.load(load(revision="r1"))
            assert first.code == Code.OK, first.message
            before = instance(worker)
            async with traffic(a, [(x, want)], senders=4) as answered:
                await asyncio.sleep(0.2)
                second = await a.load(load(2, revision="r2"))
                assert second.code == Code.OK and not second.reused, second.message
                assert instance(worker) is not before
                await asyncio.sleep(0.2)
            return answered(), a.direct_calls, first.channel, second.channel

    answered, direct, first, second = asyncio.run(scenario())
    assert first == second
    assert answered == direct > 0


def test_an_unload_closes_the_channel_and_later_calls_take_the_link(worker: Worker) -> None:
    async def scenario() -> str:
        async with front(worker, 4) as a:
            done = await a.load(load())
            await infer(a, np.zeros((1, 256), dtype=np.float32))
            assert a.direct_calls == 1
            await a.unload("dense", 1)
            with pytest.raises(CallFailed) as info:
                await infer(a, np.zeros((1, 256), dtype=np.float32))
            assert info.value.code == Code.NOT_LOADED
            assert info.value.message == "model 'dense' version 1 is not loaded"
            assert a.direct_calls == 1  # it went by the link
            return done.channel

    channel = asyncio.run(scenario())
    assert not Path(channel).exists()


def test_a_stranger_on_the_channel_is_shut_out_and_the_version_keeps_serving(
    worker: Worker,
) -> None:
    """A socket that names no front's connection, or sends a call before saying whose it is,
    is closed; the version's fronts never notice."""

    def closed_after(path: str, frame: bytes) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(frame)
            return s.recv(1) == b""

    x = np.full((1, 256), 0.5, dtype=np.float32)

    async def scenario() -> None:
        async with front(worker, 5) as a:
            done = await a.load(load())
            assert closed_after(done.channel, encode(Attach(987654)))
            assert closed_after(done.channel, b"\x05\x00\x00\x00garbage")
            assert_dense(await infer(a, x), x)
            assert a.direct_calls == 1

    asyncio.run(scenario())


def test_a_full_queue_and_the_status_of_queued_calls_work_on_the_channel(
    worker: Worker,
) -> None:
    batching = Batching(max_queue_delay_us=60_000_000, preferred=(8,), max_queue_size=1)
    x = np.zeros((1, 256), dtype=np.float32)

    async def scenario() -> None:
        async with front(worker, 6) as a:
            assert (await a.load(load(batching=batching))).code == Code.OK
            waiting = asyncio.create_task(infer(a, x, deadline_s=60))  # waits for 8 rows
            deadline = time.monotonic() + 10
            while not (await a.status()).queued:
                assert time.monotonic() < deadline, "the status never showed the queued call"
                await asyncio.sleep(0.01)
            (queued,) = (await a.status()).queued
            assert (queued.name, queued.version, queued.calls) == ("dense", 1, 1)
            with pytest.raises(CallFailed) as full:
                await infer(a, x)
            assert full.value.code == Code.OVERLOADED
            assert "queue full (1 requests waiting, max_queue_size 1)" in full.value.message
            await a.unload("dense", 1)  # drains: the waiting call is answered
            result = await waiting
            assert_dense(result, x)
            assert a.direct_calls == 2

    asyncio.run(scenario())


def test_a_front_that_goes_leaves_the_others_served(worker: Worker) -> None:
    x = np.full((1, 256), 2.0, dtype=np.float32)

    async def scenario() -> None:
        async with front(worker, 7) as a:
            assert (await a.load(load())).code == Code.OK
            async with front(worker, 8) as b:
                assert (await b.load(load(2))).reused
                await infer(b, x)
                assert b.direct_calls == 1
            # b is gone (its link and its channel closed); a goes on
            for _ in range(3):
                assert_dense(await infer(a, x), x)
            assert a.direct_calls == 3

    asyncio.run(scenario())


def test_a_front_that_goes_with_a_call_queued_does_not_fail_its_batch_mates(
    worker: Worker,
) -> None:
    """Front a's call waits in the queue for a second row when a leaves; b's call then forms
    the batch with it. a's arena is still mapped for its queued call (before, the worker had
    closed it: reading a released buffer failed the whole batch, b's call included). (a
    leaves without cancelling its call: a cancelled call would leave the queue.)"""
    x = np.full((1, 256), 2.0, dtype=np.float32)

    async def scenario() -> None:
        async with front(worker, 1) as b:
            assert (await b.load(load(batching=WAIT_FOR_TWO))).code == Code.OK
            async with front(worker, 2) as a:
                assert (await a.load(load(2, batching=WAIT_FOR_TWO))).code == Code.OK
                queued = asyncio.create_task(infer(a, x))
                await asyncio.sleep(0.3)
            with pytest.raises(WorkerGone):  # a closed its link under its call
                await queued
            await asyncio.sleep(0.3)  # a is gone, its call still queued
            assert_dense(await infer(b, x, deadline_s=10), x)

    asyncio.run(scenario())


class _OutOfDescriptors:
    """A channel listener whose first `fails` accepts fail as with no descriptor left."""

    def __init__(self, real: socket.socket, fails: int) -> None:
        self.real, self.fails = real, fails

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        if self.fails > 0:
            self.fails -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def close(self) -> None:
        self.real.close()


def test_a_channel_accept_that_fails_for_a_while_does_not_stop_the_version(
    worker: Worker,
) -> None:
    """EMFILE on accept: the serving thread goes on (before, it ended, and every later call of
    the version was queued with nobody to run it); the fronts' connections wait in the
    backlog and are served once a descriptor is free."""
    x = np.full((1, 256), 2.0, dtype=np.float32)

    async def scenario() -> None:
        async with front(worker, 1) as a:
            assert (await a.load(load())).code == Code.OK
            chans = worker.channels.get(("dense", 1))
            assert chans is not None
            chans._listener = _OutOfDescriptors(chans._listener, fails=5)  # type: ignore[assignment]
            async with front(worker, 2) as b:
                assert (await b.load(load(2))).code == Code.OK
                assert_dense(await infer(a, x, deadline_s=10), x)
                assert_dense(await infer(b, x, deadline_s=10), x)
                assert a.direct_calls == b.direct_calls == 1

    asyncio.run(scenario())


def test_the_table_makes_one_socket_per_version_or_none_when_it_cannot(
    tmp_path: Path,
) -> None:
    """A socket that cannot be bound (here: its directory does not exist) gives None: the
    worker then loads the version without a channel (LoadDone.channel empty) and calls come
    through the fronts' links. Otherwise one socket per version, removed when closed."""
    table = ChannelTable(str(tmp_path / "gone" / "w.sock"), lambda _id: None)
    assert table.open(("dense", 1)) is None
    assert table.get(("dense", 1)) is None
    made = ChannelTable(str(tmp_path / "w.sock"), lambda _id: None)
    channels = made.open(("dense", 1))
    assert channels is not None and made.open(("dense", 1)) is channels
    assert Path(channels.path).exists()
    made.close_all()
    assert not Path(channels.path).exists()


@pytest.mark.parametrize("how", ["two instances", "reloaded without batching"])
def test_a_batcher_that_cannot_read_a_channel_has_none_and_its_calls_take_the_link(
    tmp_path: Path, how: str
) -> None:
    """A plain version with two instances gets no channel (the one that read it would hold
    the other back while it runs a batch); a version reloaded without batching loses its
    channel, and the front goes back to its link."""
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu")
    x = np.full((1, 256), 0.25, dtype=np.float32)

    async def scenario() -> None:
        with serving_worker(settings) as worker:
            async with front(worker, 9) as a:
                if how == "two instances":
                    done = await a.load(load(batching=Batching(instances=2)))
                    assert done.code == Code.OK and done.channel == ""
                else:
                    first = await a.load(load(revision="r1"))
                    assert first.channel
                    assert_dense(await infer(a, x), x)
                    assert a.direct_calls == 1
                    done = await a.load(load(2, batching=None, revision="r2"))
                    assert done.code == Code.OK and done.channel == ""
                    deadline = time.monotonic() + 10
                    while exists(first.channel):  # closed once the old one drained
                        assert time.monotonic() < deadline, "the channel stayed open"
                        await asyncio.sleep(0.01)
                calls = a.direct_calls
                for _ in range(3):
                    assert_dense(await infer(a, x), x)
                assert a.direct_calls == calls

    asyncio.run(scenario())


def test_calls_sent_on_the_channel_across_a_reload_without_batching_are_all_answered(
    tmp_path: Path,
) -> None:
    """Calls keep flowing while a plain batched version is reloaded without batching: those
    the front sends on its channel before it reads LoadDone are still read there and run
    alone. None fails, and the channel closes once the front has left it."""
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu")
    x = np.full((1, 256), 0.5, dtype=np.float32)
    want = expected(x)

    async def scenario() -> tuple[int, int, int]:
        with serving_worker(settings) as worker:
            async with front(worker, 12) as a:
                first = await a.load(load(revision="r1"))
                assert first.code == Code.OK and first.channel, first.message
                async with traffic(a, [(x, want)], senders=8) as answered:
                    await asyncio.sleep(0.2)
                    sent_direct = a.direct_calls
                    done = await a.load(load(2, batching=None, revision="r2"))
                    assert done.code == Code.OK and done.channel == "", done.message
                    direct_at_reload = a.direct_calls
                    await asyncio.sleep(0.2)
                assert a.direct_calls == direct_at_reload  # after LoadDone: the link
                deadline = time.monotonic() + 10
                while exists(first.channel):
                    assert time.monotonic() < deadline, "the channel stayed open"
                    await asyncio.sleep(0.01)
                return answered(), sent_direct, direct_at_reload

    answered, before, at_reload = asyncio.run(scenario())
    assert 0 < before <= at_reload < answered
