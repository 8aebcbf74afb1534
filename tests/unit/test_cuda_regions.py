"""server.cuda_regions.CudaRegions with several fronts: two SharedMemoryRegistry objects over
one directory stand for two fronts, each with an in-memory worker connection (`Worker`: the
worker's table of CUDA regions opened for that front, one per name, as runtime.engine.regions
keeps it). A re-registration through a front that had adopted the old one, a worker that goes
away under a register or an adopt, a record that cannot be written, and a worker restart
while the client registered the name again elsewhere."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import server.shm_directory as shm_directory
from runtime.client import WorkerGone
from runtime.ipc.protocol import Code, RegionDone
from server.cuda_regions import CudaRegions
from server.errors import NotReady
from server.shm_directory import RegionDirectory
from server.shm_regions import SharedMemoryRegistry
from server.types import InferRequest, ShmRef, Tensor

OLD, NEW = b"o" * 64, b"n" * 64  # two IPC handles


class Worker:
    """One front's connection to the worker: the CUDA regions open for it, by name."""

    def __init__(self) -> None:
        self.open: dict[str, bytes] = {}
        self.gone = False  # the link dropped: every call raises WorkerGone
        self.unopenable: set[bytes] = set()  # handles whose memory is gone (owner exited)

    async def open_region(self, name: str, handle: bytes, device: int, size: int) -> RegionDone:
        if self.gone:
            raise WorkerGone("worker process exited")
        if name in self.open:
            return RegionDone(
                1, Code.BAD_INPUT, f"shared memory region '{name}' already in manager"
            )
        if handle in self.unopenable:
            return RegionDone(1, Code.BAD_INPUT, "invalid CUDA IPC handle")
        self.open[name] = handle
        return RegionDone(1, Code.OK, "")

    async def close_region(self, name: str) -> RegionDone:
        if self.gone:
            raise WorkerGone("worker process exited")
        self.open.pop(name, None)
        return RegionDone(1, Code.OK, "")


def front(directory: Path) -> tuple[CudaRegions, Worker]:
    worker = Worker()
    link = SimpleNamespace(ready=True, require=lambda: worker)
    return CudaRegions(SharedMemoryRegistry(True, RegionDirectory(directory)), link), worker  # type: ignore[arg-type]


def using(name: str) -> InferRequest:
    """A request whose input lies in region `name`."""
    t = Tensor("IN", "FP32", (3, 4), b"", ShmRef(name, 0, 48))
    return InferRequest("m", "", "", (t,), (), {})


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_name_registered_again_through_a_front_that_had_adopted_it(tmp_path: Path) -> None:
    """perf_analyzer unregisters everything, then registers: its new connection may land on
    the front that only used the old registration (it failed "already in manager")."""
    a, _ = front(tmp_path)
    b, b_worker = front(tmp_path)
    run(a.register("g", OLD, 0, 48))
    run(b.adopt(using("g")))
    assert b_worker.open == {"g": OLD}
    run(a.unregister("g"))
    run(b.register("g", NEW, 0, 48))
    assert b_worker.open == {"g": NEW}
    assert [r.raw_handle for r in a.status("g")] == [NEW]


def test_a_worker_gone_under_a_register_or_an_adopt_is_unavailable(tmp_path: Path) -> None:
    a, _ = front(tmp_path)
    b, b_worker = front(tmp_path)
    run(a.register("g", OLD, 0, 48))
    b_worker.gone = True
    with pytest.raises(NotReady, match=r"the runtime worker is unavailable \(.*\); retry"):
        run(b.register("h", NEW, 0, 48))
    with pytest.raises(NotReady, match=r"the runtime worker is unavailable \(.*\); retry"):
        run(b.adopt(using("g")))
    run(b.sweep())  # closing what is stale does not raise either
    b_worker.gone = False
    run(b.register("h", NEW, 0, 48))  # the name was not taken by the failed register
    assert b_worker.open == {"h": NEW}


def test_a_region_whose_record_cannot_be_written_is_closed_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, worker = front(tmp_path)
    real = shm_directory.create_file

    def full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm_directory, "create_file", full)
    with pytest.raises(OSError, match="No space left"):
        run(a.register("g", OLD, 0, 48))
    assert worker.open == {}
    monkeypatch.setattr(shm_directory, "create_file", real)
    run(a.register("g", OLD, 0, 48))  # space is back: the name registers
    assert worker.open == {"g": OLD}


def test_a_worker_restart_keeps_a_newer_registration_of_the_pod(tmp_path: Path) -> None:
    """Front A adopted "g"; the client unregistered and registered it again through B; A's
    new worker cannot open the old handle, and A must not delete B's record of the new one."""
    a, a_worker = front(tmp_path)
    b, _ = front(tmp_path)
    run(b.register("g", OLD, 0, 48))
    run(a.adopt(using("g")))
    run(b.unregister("g"))
    run(b.register("g", NEW, 0, 48))
    a_worker.open.clear()  # a new worker: nothing open
    a_worker.unopenable.add(OLD)
    run(a.reopen())
    assert [r.raw_handle for r in b.status("g")] == [NEW]
    run(a.adopt(using("g")))  # and A adopts the new one on its next use
    assert a_worker.open == {"g": NEW}


def test_a_worker_restart_drops_a_region_whose_owner_exited(tmp_path: Path) -> None:
    a, a_worker = front(tmp_path)
    run(a.register("g", OLD, 0, 48))
    a_worker.open.clear()
    a_worker.unopenable.add(OLD)
    run(a.reopen())
    assert a.status("") == []
