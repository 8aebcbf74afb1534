"""runtime.client.RuntimeClient reads the worker's frames however the stream cuts them: a
fake worker in the test's loop answers every call, and writes its answers whole, one byte at a
time, or cut at random points across frames. Every call gets its own answer, and its outputs
are read from its own slots of the arena."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from runtime.client import PreparedInput, RuntimeClient, WorkerGone
from runtime.ipc.protocol import (
    FRAME_HEADER,
    PROTOCOL_VERSION,
    Code,
    Hello,
    Infer,
    InferDone,
    OutputData,
    Welcome,
    decode_front,
    encode,
)
from runtime.ipc.shm import Arena, SlotPool

SLOT = 4096


class FakeWorker(asyncio.Protocol):
    """Welcome for Hello; for each Infer, writes its input (an int32) plus 1000 into the call's
    output slot of the arena and answers OK. `cut` decides how its writes are split."""

    def __init__(self, arena: Arena, cut: str, rng: random.Random) -> None:
        self.arena, self.cut, self.rng = arena, cut, rng
        self.buf = bytearray()
        self.pending = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        while len(self.buf) - pos >= FRAME_HEADER.size:
            (n,) = FRAME_HEADER.unpack_from(self.buf, pos)
            if len(self.buf) - pos - FRAME_HEADER.size < n:
                break
            start = pos + FRAME_HEADER.size
            msg = decode_front(bytes(self.buf[start : start + n]))
            pos = start + n
            if isinstance(msg, Hello):
                self.transport.write(encode(Welcome(PROTOCOL_VERSION, os.getpid(), "cpu", ())))
            elif isinstance(msg, Infer):
                ref, off = msg.inputs[0], msg.out_offset
                x = int.from_bytes(self.arena.buf[ref.offset : ref.offset + 4], "little")
                self.arena.buf[off : off + 4] = (x + 1000).to_bytes(4, "little")
                out = OutputData("OUTPUT0", "INT32", (1, 1), off, 4)
                self.pending += encode(InferDone(msg.call_id, Code.OK, outputs=(out,)))
        del self.buf[:pos]
        asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        data, self.pending = bytes(self.pending), bytearray()
        if self.cut == "whole":
            self.transport.write(data)
            return
        i = 0
        while i < len(data):
            step = 1 if self.cut == "bytes" else self.rng.randint(1, 40)
            self.transport.write(data[i : i + step])
            i += step


@pytest.mark.parametrize("cut", ["whole", "bytes", "random"])
def test_every_call_gets_its_answer_however_frames_are_cut(tmp_path: Path, cut: str) -> None:
    async def scenario() -> list[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        arena = Arena(f"/microtune-test-frames-{os.getpid()}-{cut}", 64 * SLOT, create=True)
        path = str(tmp_path / "w.sock")
        server = await loop.create_unix_server(
            lambda: FakeWorker(arena, cut, random.Random(7)), path
        )
        client = RuntimeClient(path, arena, SlotPool(SLOT, 64), 0)
        try:
            await client.connect()

            async def call(i: int) -> tuple[int, bytes]:
                await asyncio.sleep(i % 3 * 0.001)
                x = (PreparedInput("INPUT0", "INT32", (1, 1), i.to_bytes(4, "little")),)
                r = await client.infer("m", 1, x, ("OUTPUT0",), 4, None)
                return i, r.outputs[0].data

            # Bounded: a frame the client lost would leave its call waiting for ever.
            return await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(40))), 10)
        finally:
            await client.close()
            server.close()
            arena.unlink()
            arena.close()

    results = asyncio.run(scenario())
    assert [(i, int.from_bytes(data, "little")) for i, data in results] == [
        (i, i + 1000) for i in range(40)
    ]


class SilentWorker(FakeWorker):
    """Welcomes the front, then never answers a call."""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= FRAME_HEADER.size:
            (n,) = FRAME_HEADER.unpack_from(self.buf, 0)
            if len(self.buf) - FRAME_HEADER.size < n:
                return
            msg = decode_front(bytes(self.buf[FRAME_HEADER.size : FRAME_HEADER.size + n]))
            del self.buf[: FRAME_HEADER.size + n]
            if isinstance(msg, Hello):
                self.transport.write(encode(Welcome(PROTOCOL_VERSION, os.getpid(), "cpu", ())))


def test_a_call_that_waited_for_room_while_the_worker_went_returns_its_slot_once(
    tmp_path: Path,
) -> None:
    """A fills the one slot; B waits for room; the worker goes: A fails and frees the slot,
    B leases it and fails to send. B's slot goes back once: the client's close afterwards
    (a shutdown before the restart reconnected) must not return it again."""

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        arena = Arena(f"/microtune-test-frames-{os.getpid()}-room", SLOT, create=True)
        path = str(tmp_path / "w.sock")
        workers: list[SilentWorker] = []

        def make() -> SilentWorker:
            workers.append(SilentWorker(arena, "whole", random.Random(0)))
            return workers[-1]

        server = await loop.create_unix_server(make, path)
        pool = SlotPool(SLOT, 1)
        client = RuntimeClient(path, arena, pool, 0)
        try:
            await client.connect()
            x = (PreparedInput("INPUT0", "INT32", (1, 1), (1).to_bytes(4, "little")),)
            calls = [asyncio.create_task(client.infer("m", 1, x, ("OUTPUT0",), 4, None))]
            await asyncio.sleep(0.05)
            calls.append(asyncio.create_task(client.infer("m", 1, x, ("OUTPUT0",), 4, None)))
            await asyncio.sleep(0.05)
            workers[0].transport.close()  # the worker is gone
            errors = []
            for call in calls:
                with pytest.raises(WorkerGone) as ei:
                    await asyncio.wait_for(call, 5)
                errors.append(str(ei.value))
            await client.close()  # raised "double release" before
            assert pool.try_lease(SLOT) is not None  # the one slot is free, once
            return errors
        finally:
            server.close()
            arena.unlink()
            arena.close()

    assert asyncio.run(scenario()) == ["worker process exited", "worker is not connected"]


def test_a_call_cancelled_as_the_link_fails_it_stays_cancelled(tmp_path: Path) -> None:
    """The caller is cancelled (its client cancelled the RPC) in the same loop turn as a lost
    link fails its call: the cancellation must propagate, not turn into WorkerGone (which the
    handler answers UNAVAILABLE, and the canary guard counts as a failure)."""

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        arena = Arena(f"/microtune-test-frames-{os.getpid()}-cancel", 8 * SLOT, create=True)
        path = str(tmp_path / "w.sock")
        server = await loop.create_unix_server(
            lambda: SilentWorker(arena, "whole", random.Random(1)), path
        )
        client = RuntimeClient(path, arena, SlotPool(SLOT, 8), 0)
        try:
            await client.connect()
            x = (PreparedInput("INPUT0", "INT32", (1, 1), (1).to_bytes(4, "little")),)
            task = asyncio.create_task(client.infer("m", 1, x, ("OUTPUT0",), 4, None))
            await asyncio.sleep(0.05)  # sent, waiting for its answer
            client._fail_all(WorkerGone("worker process exited"))  # the link is lost ...
            task.cancel()  # ... as the caller is cancelled
            with pytest.raises(asyncio.CancelledError):
                await task
            await client.close()
            return task.cancelled()
        finally:
            server.close()
            arena.unlink()
            arena.close()

    assert asyncio.run(scenario())
