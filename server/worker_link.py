"""The front's handle on the runtime worker: process, arena, client, and automatic restart.

Each worker generation gets a fresh shared-memory arena and client. When the link drops, every
call in flight fails at once (WorkerGone -> UNAVAILABLE), `ready` turns false, and a new worker
is spawned with backoff; `on_restart` then reloads the models (server.lifecycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from runtime.client import RuntimeClient, WorkerGone
from runtime.ipc.protocol import Welcome
from runtime.ipc.shm import Arena, SlotPool, arena_name, remove_stale_arenas
from runtime.process import WorkerProcess
from runtime.settings import WorkerSettings
from server.settings import Settings

__all__ = ["WorkerLink"]

log = logging.getLogger(__name__)


class WorkerLink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._dir = Path(tempfile.mkdtemp(prefix="microtune-"))
        self.worker_settings = WorkerSettings(
            socket_path=str(self._dir / "worker.sock"),
            device=settings.device,
            exec_threads=settings.worker_threads,
            log_level=settings.log_level,
            parent_pid=os.getpid(),
        )
        self.process = WorkerProcess(self.worker_settings)
        self.client: RuntimeClient | None = None
        self._arena: Arena | None = None
        self._generation = 0
        self.restarts = 0
        self.on_restart: Callable[[], Awaitable[None]] | None = None
        self.on_lost: Callable[[], None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.welcome: Welcome | None = None

    @property
    def ready(self) -> bool:
        return self.client is not None and not self.client.closed

    def require(self) -> RuntimeClient:
        if self.client is None or self.client.closed:
            raise WorkerGone("the runtime worker is restarting")
        return self.client

    async def start(self) -> None:
        removed = remove_stale_arenas()
        if removed:
            log.info("removed stale shared-memory arenas: %s", ", ".join(removed))
        await self._spawn_and_connect()

    async def _spawn_and_connect(self) -> None:
        self.process.start()
        await asyncio.to_thread(self.process.wait_listening, self.settings.worker_start_timeout_s)
        self._generation += 1
        s = self.settings
        arena = Arena(
            arena_name(os.getpid(), self._generation), s.shm_slot_bytes * s.shm_slots, create=True
        )
        client = RuntimeClient(
            self.worker_settings.socket_path,
            arena,
            SlotPool(s.shm_slot_bytes, s.shm_slots),
            frontend_id=0,
        )
        try:
            self.welcome = await client.connect(on_lost=self._lost)
        except BaseException:
            arena.unlink()
            arena.close()
            raise
        self._retire_arena()
        self._arena, self.client = arena, client
        log.info(
            "runtime worker %d up on %s (providers: %s)",
            self.welcome.pid,
            self.welcome.device,
            ", ".join(self.welcome.providers),
        )

    def _retire_arena(self) -> None:
        if self._arena is not None:
            self._arena.unlink()
            self._arena.close()
            self._arena = None

    def _lost(self) -> None:
        if self._stopping:
            return
        log.error("runtime worker died (exit code %s); restarting", self.process.exitcode)
        if self.on_lost is not None:
            self.on_lost()
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        delay = 0.1
        while not self._stopping:
            self.process.kill()
            await asyncio.to_thread(self.process.stop, 2.0)
            try:
                await self._spawn_and_connect()
            except Exception as exc:
                log.error("worker restart failed: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.restarts += 1
            if self.on_restart is not None:
                await self.on_restart()
            return

    async def stop(self) -> None:
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart_task
        if self.client is not None:
            await self.client.close()
        await asyncio.to_thread(self.process.stop, 5.0)
        self._retire_arena()
        with contextlib.suppress(OSError):
            for p in self._dir.iterdir():
                p.unlink()
            self._dir.rmdir()
