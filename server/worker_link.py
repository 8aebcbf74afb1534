"""The front's handle on the runtime worker: arena, client, and recovery when the worker dies.

Two modes. With one front (the default) the front owns the worker process: it spawns it, and
respawns it with backoff when it dies. With `--frontends N` the supervisor (server.supervisor)
owns the worker and each front only attaches to its socket, reconnecting when the supervisor
has started a new one. Each connection gets a fresh shared-memory arena and client. When the
link drops, every call in flight fails at once (WorkerGone -> UNAVAILABLE), `ready` turns false,
and after reconnecting `on_restart` reloads the models (server.lifecycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from runtime.client import RuntimeClient, WorkerGone
from runtime.ipc.protocol import Timings, Welcome, WorkerStatus
from runtime.ipc.shm import Arena, ArenaNoSpace, SlotPool, arena_name
from runtime.process import WorkerProcess, WorkerStartFailed
from runtime.settings import WorkerSettings
from server.errors import CannotStart
from server.restarts import Decision, RestartHistory, RestartPolicy, after_death
from server.rundir import make_rundir, remove_leftovers, remove_rundir
from server.settings import Settings
from server.telemetry.logs import setup_logging

__all__ = ["WorkerLink", "worker_log_setup", "worker_settings_for"]

log = logging.getLogger(__name__)

# How long a front of a supervisor waits for room in /dev/shm before it gives up (code 78). A
# front restarted in place of a dead one may find the worker still holding its predecessor's
# arena: on a GPU, unpinning it waits for the device lock, which a load or a capture may hold
# for seconds. (A supervisor checks room for every arena before its first fronts start, and a
# lone front has no predecessor: it gives up at once.)
ARENA_ROOM_WAIT_S = 30.0


def worker_log_setup(settings: Settings) -> Callable[[], object]:
    """What the spawned worker runs first: the front's log format and level (JSON lines in a
    container), instead of the worker's text fallback on the shared stderr."""
    return functools.partial(setup_logging, settings.log_level, settings.log_format)


def worker_settings_for(settings: Settings, socket_path: str) -> WorkerSettings:
    return WorkerSettings(
        socket_path=socket_path,
        device=settings.device,
        exec_threads=settings.worker_threads,
        log_level=settings.log_level,
        cpu_graphs=settings.cpu_graphs,
        fake_cuda_ipc=settings.fake_cuda_ipc,
        parent_pid=os.getpid(),
    )


class WorkerLink:
    def __init__(self, settings: Settings, frontend_id: int = 0) -> None:
        self.settings = settings
        self.frontend_id = frontend_id
        self.owner = not settings.worker_socket
        self._dir: Path | None = None
        if self.owner:
            self._dir = make_rundir()
            socket_path = str(self._dir / "worker.sock")
        else:
            socket_path = settings.worker_socket
        self.worker_settings = worker_settings_for(settings, socket_path)
        self.process = (
            WorkerProcess(self.worker_settings, worker_log_setup(settings)) if self.owner else None
        )
        self.client: RuntimeClient | None = None
        self._arena: Arena | None = None
        self._spare: Arena | None = None  # created, not yet connected (_connect_once)
        self._generation = 0
        self.restarts = 0
        self.on_restart: Callable[[], Awaitable[None]] | None = None
        self.on_lost: Callable[[], None] | None = None
        # Given to every client (RuntimeClient.on_orphan_execution): statistics of executions
        # whose counted call was abandoned.
        self.on_orphan_execution: Callable[[str, int, Timings], None] | None = None
        # A front that owns its worker gives up on one that keeps dying (server.restarts); a
        # front of the supervisor never does: the supervisor decides, and stops it.
        self._policy = (
            RestartPolicy(limit=settings.restart_limit, window_s=settings.restart_window_s)
            if self.owner
            else RestartPolicy(limit=0, first_delay_s=0.1, max_delay_s=1.0)
        )
        self._deaths = RestartHistory()
        self._next = Decision(give_up=False, delay_s=0.0, recent=0)
        self.gave_up = False
        self.on_give_up: Callable[[], None] | None = None
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

    async def status(self, timeout_s: float) -> WorkerStatus | None:
        """The worker's report on this front (runtime.client.RuntimeClient.status); None while
        no worker is connected, when nothing of this front waits or is pinned in a worker.
        TimeoutError when a connected worker has not answered within `timeout_s`."""
        client = self.client
        if client is None or client.closed:
            return None
        try:
            # (asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that races the answer, and the metrics task that calls this then never stops)
            async with asyncio.timeout(timeout_s):
                return await client.status()
        except WorkerGone:
            return None

    async def start(self) -> None:
        """Start (or, under the supervisor, reach) the worker. A lone front whose worker
        cannot start raises CannotStart: as configured, it would fail the same way again (a
        front under the supervisor leaves the retries to it)."""
        try:
            if self.owner:
                remove_leftovers()
                await self._spawn()
            await self._connect(self.settings.worker_start_timeout_s)
        except (WorkerStartFailed, WorkerGone, OSError, TimeoutError) as exc:
            if not self.owner:
                raise
            raise CannotStart(str(exc) or type(exc).__name__) from None

    async def _spawn(self) -> None:
        assert self.process is not None
        self.process.start()
        await asyncio.to_thread(self.process.wait_listening, self.settings.worker_start_timeout_s)

    async def _connect(self, within_s: float) -> None:
        """Connect to the worker's socket, retrying for `within_s` (it may be starting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        no_space_until = loop.time() + (0.0 if self.owner else ARENA_ROOM_WAIT_S)
        while True:
            try:
                await self._connect_once()
                return
            except ArenaNoSpace:
                if loop.time() > no_space_until or self._stopping:
                    raise
                await asyncio.sleep(0.1)
            except (OSError, WorkerGone, TimeoutError):
                if loop.time() > deadline or self._stopping:
                    raise
                if self.process is not None and not self.process.is_alive():
                    raise WorkerGone(
                        f"the runtime worker exited (code {self.process.exitcode}) before "
                        "the front could connect"
                    ) from None
                await asyncio.sleep(0.05)

    async def _connect_once(self) -> None:
        if self.client is not None and self.client.closed and self._arena is not None:
            # The lost worker's arena goes first: a /dev/shm sized for one arena per front
            # (the arena's pages are reserved) has no room for the new one beside it.
            self._arena = _remove(self._arena)
        s = self.settings
        # Kept across failed attempts: while a worker restarts, the connection is retried every
        # 50 ms, and a new arena each time would reserve (and zero) its pages anew. Taken, not
        # shared: two connectors (start-up's and a recovery's) must never hold the same one.
        arena, self._spare = self._spare, None
        if arena is None:
            self._generation += 1
            arena = Arena(
                arena_name(os.getpid(), self._generation),
                s.shm_slot_bytes * s.shm_slots,
                create=True,
            )
        client = RuntimeClient(
            self.worker_settings.socket_path,
            arena,
            SlotPool(s.shm_slot_bytes, s.shm_slots),
            frontend_id=self.frontend_id,
        )
        client.on_orphan_execution = self.on_orphan_execution
        try:
            self.welcome = await client.connect(on_lost=lambda: self._lost(client))
        except (ConnectionRefusedError, FileNotFoundError):
            # Nothing listens yet: no worker saw the arena; the next attempt takes it back.
            if self._spare is None:
                self._spare = arena
            else:
                _remove(arena)
            raise
        except BaseException:
            _remove(arena)  # a worker may have mapped it, and may unlink it
            raise
        if self._arena is not None:
            self._arena = _remove(self._arena)
        self._arena, self.client = arena, client
        log.info(
            "runtime worker %d connected on %s (providers: %s)",
            self.welcome.pid,
            self.welcome.device,
            ", ".join(self.welcome.providers),
        )

    def _retire_arena(self) -> None:
        """Remove the arena in use and a spare one."""
        self._arena = _remove(self._arena) if self._arena is not None else None
        self._spare = _remove(self._spare) if self._spare is not None else None

    def _lost(self, client: RuntimeClient) -> None:
        # Only the connected client's loss is a worker lost to recover from: a client that
        # loses its worker during the handshake fails its connect, and its connector (start-up
        # or `_restart`) deals with that, and counts the death once.
        if self._stopping or client is not self.client:
            return
        # (it said "exit code None": the link closes before the worker is reaped; a short
        # wait, on this path only)
        code = self.process.exit_code(0.2) if self.process is not None else "?"
        log.error("runtime worker link lost (worker exit code %s); recovering", code)
        if self.on_lost is not None:
            self.on_lost()
        self._died()
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    def _died(self) -> None:
        self._deaths, self._next = after_death(
            self._policy, self._deaths, asyncio.get_running_loop().time()
        )

    async def _restart(self) -> None:
        while not self._stopping:
            decision = self._next
            if decision.give_up:
                log.error(
                    "the runtime worker died %d times within %g s; giving up: the server "
                    "exits so that its container is restarted",
                    decision.recent,
                    self._policy.window_s,
                )
                self.gave_up = True
                if self.on_give_up is not None:
                    self.on_give_up()
                return
            if decision.delay_s:
                log.error("restarting the runtime worker in %.1f s", decision.delay_s)
                await asyncio.sleep(decision.delay_s)
            try:
                if self.process is not None:
                    self.process.kill()
                    await asyncio.to_thread(self.process.stop, 2.0)
                    await self._spawn()
                    await self._connect(5.0)
                else:  # the supervisor respawns it: wait for the new socket
                    await self._connect(self.settings.worker_start_timeout_s)
            except Exception as exc:
                log.error("worker recovery failed: %s", exc)
                self._died()
                continue
            self.restarts += 1
            if self.on_restart is not None:
                try:
                    await self.on_restart()  # the models load again
                except Exception:
                    log.exception("reloading the models after a worker restart failed")
            if self.client is not None and not self.client.closed:
                return
            # The worker died again while the models reloaded (a model whose load kills it
            # is found out this way: reload_all loads it alone): `_lost` counted the death and
            # left the recovery to this task, which goes on.
            log.error("runtime worker lost again during recovery")

    async def stop(self) -> None:
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart_task
        if self.client is not None:
            await self.client.close()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop, 5.0)
        self._retire_arena()
        if self._dir is not None:
            remove_rundir(self._dir)


def _remove(arena: Arena) -> None:
    arena.unlink()
    arena.close()
