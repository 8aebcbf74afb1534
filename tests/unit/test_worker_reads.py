"""The worker's Connection reads the front's frames however the stream cuts them: calls for a
model that is not loaded, written whole, one byte at a time, or cut at random points across
frames, each get exactly one answer (NOT_LOADED, naming the model)."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from worker_frames import read_frame

from runtime.ipc.protocol import Code, Infer, InferDone, Shutdown, encode
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from runtime.worker_connection import Connection

CALLS = 30


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu"))
    yield w
    w.close_lanes()


@pytest.mark.parametrize("cut", ["whole", "bytes", "random"])
def test_every_call_is_answered_once_however_frames_are_cut(worker: Worker, cut: str) -> None:
    ours, front = socket.socketpair()
    front.settimeout(10)  # a frame the worker lost would leave read_frame waiting for ever
    reader = threading.Thread(target=Connection(worker, ours).run, daemon=True)
    reader.start()
    try:
        data = b"".join(
            encode(Infer(i, f"model-{i}", 1, (), (), 0, 0)) for i in range(1, CALLS + 1)
        )
        rng = random.Random(3)
        i = 0
        while i < len(data):
            step = len(data) if cut == "whole" else 1 if cut == "bytes" else rng.randint(1, 60)
            front.sendall(data[i : i + step])
            i += step
        answers = [read_frame(front) for _ in range(CALLS)]
        front.sendall(encode(Shutdown()))
        reader.join(10)
    finally:
        front.close()
    assert all(isinstance(a, InferDone) and a.code == Code.NOT_LOADED for a in answers)
    by_id = {a.call_id: a.message for a in answers if isinstance(a, InferDone)}
    assert by_id == {i: f"model 'model-{i}' version 1 is not loaded" for i in range(1, CALLS + 1)}
    assert not reader.is_alive()
