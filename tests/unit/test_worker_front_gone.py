"""When a front goes, the worker lets go of its arena: the mapping goes with the connection's
last reference, by reference counting alone. A worker allocates too few objects for Python's
cyclic collector to run often, so a connection kept alive by a reference cycle kept 64 MiB of
/dev/shm per dead front for as long as the worker lived, and a pod that restarted fronts ran
out of room."""

from __future__ import annotations

import gc
import os
import socket
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_frames import read_frame

from runtime.ipc.protocol import PROTOCOL_VERSION, Hello, Welcome, encode
from runtime.ipc.shm import Arena
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from runtime.worker_connection import Connection

SIZE = 1 << 20


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu"))
    yield w
    w.close_lanes()


def mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(name[1:] in line for line in f)


def test_a_gone_front_s_arena_is_unmapped_without_a_cyclic_collection(worker: Worker) -> None:
    name = f"/microtune-test-{os.getpid()}-gone"
    front_arena = Arena(name, SIZE, create=True)
    ours, theirs = socket.socketpair()
    gc.disable()  # what frees it must be reference counting
    try:
        conn = Connection(worker, ours, id=3)
        gone = weakref.ref(conn)
        reader = threading.Thread(target=conn.run)
        reader.start()
        theirs.sendall(encode(Hello(PROTOCOL_VERSION, 3, name, SIZE)))
        assert isinstance(read_frame(theirs), Welcome)
        front_arena.close()
        front_arena.unlink()
        assert mapped(name)  # the worker's mapping, now the only one
        theirs.close()  # the front dies
        reader.join(10)
        assert not reader.is_alive()
        del conn, reader
        assert gone() is None
        assert not mapped(name)
    finally:
        gc.enable()
        front_arena.unlink()
