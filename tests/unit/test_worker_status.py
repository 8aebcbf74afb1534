"""The worker's status report (GetStatus -> WorkerStatus): each front learns how many of its own
calls wait in batcher queues (plain and CUDA-graph models alike) and how much of its arena the
worker has pinned. No model runs: the batchers have no loop, so what is submitted stays queued.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from worker_frames import read_frame

from runtime.engine.batcher import Batcher, Pending
from runtime.ipc.pinning import PinnedRegion
from runtime.ipc.protocol import (
    GetStatus,
    Infer,
    QueuedCalls,
    WorkerStatus,
)
from runtime.lanes import Lane
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from runtime.worker_connection import Connection

CALL = Infer(1, "m", 1, (), (), 0, 0)
NEVER_NS = 10**15  # a queue delay no test waits out


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu"))
    yield w
    w.close_lanes()


@pytest.fixture
def fronts(worker: Worker) -> Iterator[tuple[Connection, Connection, socket.socket]]:
    """Two fronts' connections; the third item is the first front's end of its socket."""
    a_sock, a_front = socket.socketpair()
    b_sock, b_front = socket.socketpair()
    yield Connection(worker, a_sock), Connection(worker, b_sock), a_front
    for s in (a_sock, a_front, b_sock, b_front):
        s.close()


def _queue(worker: Worker, a: Connection, b: Connection) -> None:
    plain: Batcher[Any] = Batcher(8, max_queue_delay_ns=NEVER_NS)
    worker.batchers[("dense", 1)] = plain
    for i, conn in enumerate((a, a, b)):
        plain.submit(Pending(i, 1, 0, payload=(conn, CALL, 0)))
    graphs: Batcher[Any] = Batcher(8, max_queue_delay_ns=NEVER_NS)
    worker.graph_models[("dense_large", 2)] = SimpleNamespace(batcher=graphs)  # type: ignore[assignment]
    for conn in (a, b):
        conn.arena = SimpleNamespace(buf=memoryview(bytearray(8)))  # type: ignore[assignment]
    for i, conn in enumerate((b, b, b, a)):
        # A graph model's call carries an answer callback (its connection's, or its direct
        # channel's: runtime.channels) and its front's arena, not the connection.
        answer = conn.send_quiet if i % 2 else (lambda done: None)
        assert conn.arena is not None
        graphs.submit(Pending(10 + i, 2, 0, payload=(answer, CALL, conn.arena.buf, 0, None)))
    worker.batchers[("idle", 1)] = Batcher(8)  # nothing queued: not listed


def test_each_front_sees_only_its_own_queued_calls(
    worker: Worker, fronts: tuple[Connection, Connection, socket.socket]
) -> None:
    a, b, _ = fronts
    _queue(worker, a, b)
    assert a._status(GetStatus(7)) == WorkerStatus(
        7, (QueuedCalls("dense", 1, 2), QueuedCalls("dense_large", 2, 1)), 0
    )
    assert b._status(GetStatus(8)) == WorkerStatus(
        8, (QueuedCalls("dense", 1, 1), QueuedCalls("dense_large", 2, 3)), 0
    )


def test_calls_waiting_for_a_lane_thread_are_queued_calls_too(
    worker: Worker, fronts: tuple[Connection, Connection, socket.socket]
) -> None:
    """A version without dynamic batching (the default) queues its calls on its lane: those
    waiting for its thread are pending too, counted with the batchers' in one entry per
    version; a call the thread took is no longer waiting."""
    a, b, _ = fronts
    _queue(worker, a, b)
    worker.lanes[("dense", 1)] = Lane("dense", 1, 1)
    worker.lanes[("simple", 3)] = Lane("simple", 3, 1)
    busy, running = threading.Event(), threading.Event()
    for key in (("dense", 1), ("simple", 3)):  # each lane's one thread is held
        worker.lanes[key].submit(lambda: (running.set(), busy.wait(10)))
    running.wait(10)
    a.run_alone(Infer(30, "dense", 1, (), (), 0, 0), 0)
    for i in range(3):
        a.run_alone(Infer(31 + i, "simple", 3, (), (), 0, 0), 0, lambda done: None)
    b.run_alone(Infer(40, "simple", 3, (), (), 0, 0), 0)
    assert a._status(GetStatus(7)).queued == (
        QueuedCalls("dense", 1, 3),  # 2 in the batcher + 1 for the lane
        QueuedCalls("simple", 3, 3),
        QueuedCalls("dense_large", 2, 1),
    )
    busy.set()
    deadline = time.monotonic() + 10
    while a._status(GetStatus(8)).queued != (
        QueuedCalls("dense", 1, 2),
        QueuedCalls("dense_large", 2, 1),
    ):
        assert time.monotonic() < deadline, "the lanes never took their calls"
        time.sleep(0.01)


def test_pinned_bytes_are_the_fronts_registered_arena(
    worker: Worker, fronts: tuple[Connection, Connection, socket.socket]
) -> None:
    a, b, _ = fronts
    a.pinned = PinnedRegion(0x7F00_0000_0000, 64 << 20, device_id=0, flags=1)
    assert a._status(GetStatus(1)).pinned_bytes == 64 << 20
    assert b._status(GetStatus(2)).pinned_bytes == 0  # nothing pinned (a CPU worker): 0
    a.pinned.closed = True  # unregistered: no longer page-locked
    assert a._status(GetStatus(3)).pinned_bytes == 0


def test_get_status_is_answered_on_the_socket(
    worker: Worker, fronts: tuple[Connection, Connection, socket.socket]
) -> None:
    a, b, a_front = fronts
    _queue(worker, a, b)
    assert a._handle(GetStatus(9)) is True
    report = read_frame(a_front)
    assert isinstance(report, WorkerStatus) and report.request_id == 9
    assert {(q.name, q.version, q.calls) for q in report.queued} == {
        ("dense", 1, 2),
        ("dense_large", 2, 1),
    }
