"""server.worker_link: a front of the supervisor waiting for its worker's socket (the worker is
starting, or being restarted) retries the connection every 50 ms with one arena, not a new
64 MiB arena reserved and zeroed each time, and leaves none behind when it stops."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from runtime.ipc.protocol import (
    FRAME_HEADER,
    PROTOCOL_VERSION,
    Hello,
    Welcome,
    decode_front,
    encode,
)
from server.settings import Settings
from server.worker_link import WorkerLink

SHM = Path("/dev/shm")


def arenas() -> set[str]:
    return {p.name for p in SHM.glob(f"microtune-{os.getpid()}-*")}


def test_connection_retries_keep_one_arena(tmp_path: Path) -> None:
    settings = Settings(
        worker_socket=str(tmp_path / "worker.sock"),  # nothing listens there
        worker_start_timeout_s=0.6,
        shm_slots=16,
    )
    seen: set[str] = set()
    before = arenas()  # an in-process server of another test module may hold one already

    async def scenario() -> None:
        link = WorkerLink(settings)

        async def watch() -> None:
            while True:
                seen.update(arenas() - before)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            with pytest.raises(FileNotFoundError):
                await link.start()
        finally:
            watcher.cancel()
            await link.stop()

    asyncio.run(scenario())
    assert len(seen) == 1, seen
    assert not arenas() & seen


class _FakeWorker(asyncio.Protocol):
    """Reads the front's Hello; closes the connection ("dies") or answers Welcome."""

    def __init__(self, dies: bool) -> None:
        self.dies = dies
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) < FRAME_HEADER.size:
            return
        (n,) = FRAME_HEADER.unpack_from(self.buf, 0)
        if len(self.buf) < FRAME_HEADER.size + n:
            return
        msg = decode_front(bytes(self.buf[FRAME_HEADER.size : FRAME_HEADER.size + n]))
        if isinstance(msg, Hello):
            if self.dies:
                self.transport.close()
            else:
                self.transport.write(encode(Welcome(PROTOCOL_VERSION, os.getpid(), "cpu", ())))


def test_a_worker_lost_during_the_handshake_leaves_the_link_a_working_arena(
    tmp_path: Path,
) -> None:
    """A front of the supervisor connects as its worker dies on the Hello; the supervisor
    starts another. The lost half-open client started a recovery beside start-up's own
    retries: both took the same spare arena, and the second to connect removed it under the
    first. The link said ready, and every inference failed."""
    path = str(tmp_path / "worker.sock")
    settings = Settings(worker_socket=path, worker_start_timeout_s=10, shm_slots=4)

    before = arenas()  # an in-process server of another test module may hold one already

    async def scenario() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        dying = await loop.create_unix_server(lambda: _FakeWorker(dies=True), path)
        link = WorkerLink(settings)

        async def restarted() -> None:
            await asyncio.sleep(0.3)
            dying.close()
            os.unlink(path)
            await loop.create_unix_server(lambda: _FakeWorker(dies=False), path)

        later = asyncio.create_task(restarted())
        try:
            await link.start()
            await later
            await asyncio.sleep(0.5)  # a recovery, had one started, would be done by now
            client = link.client
            assert client is not None and link.ready
            name = client.arena.name
            client.arena.buf[0:4] = b"abcd"  # raised: the memoryview was released
            mine = arenas() - before
            return name.lstrip("/") in mine, len(mine) == 1
        finally:
            await link.stop()

    assert asyncio.run(scenario()) == (True, True)
