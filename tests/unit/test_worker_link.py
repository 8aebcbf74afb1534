"""server.worker_link: a front of the supervisor waiting for its worker's socket (the worker is
starting, or being restarted) retries the connection every 50 ms with one arena, not a new
64 MiB arena reserved and zeroed each time, and leaves none behind when it stops."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

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
