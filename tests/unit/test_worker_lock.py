"""The worker's GPU lock around what frees a plain CUDA session (runtime.worker): on a GPU a
session's destruction (cudaFree, stream and handle teardown) must never run during another
version's graph capture, so it happens under the lock wherever the last reference goes. On
the CPU there is no lock; these tests stand the worker's device lock in as its GPU lock."""

from __future__ import annotations

import logging
import socket
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnxruntime as ort
import pytest

from runtime.engine.session import SessionError
from runtime.ipc.protocol import Code, Infer, InferDone, LoadModel, ModelSignature, decode_worker
from runtime.settings import WorkerSettings
from runtime.worker import Connection, Worker
from server.settings import DEMO_REPOSITORY

DENSE = DEMO_REPOSITORY / "dense" / "1" / "model.onnx"


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu"))
    w.gpu_lock = w.device_lock  # as on a CUDA worker
    yield w
    w.pool.shutdown()


def test_a_failed_load_frees_its_session_under_the_lock(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error's traceback holds the failed load's frame, and its session with it: the
    worker handles the error inside the lock, so the session goes there."""
    freed_under_lock: list[bool] = []
    lock: Any = worker.device_lock

    def failing_load(msg: LoadModel, device: str) -> object:
        session = ort.InferenceSession(str(DENSE), providers=["CPUExecutionProvider"])
        weakref.finalize(session, lambda: freed_under_lock.append(lock._is_owned()))
        raise SessionError("the signature does not match the config")

    monkeypatch.setattr("runtime.worker.LoadedModel.load", failing_load)
    done = worker.load(LoadModel(1, "dense", 1, str(DENSE), 8, ModelSignature((), ())))
    assert (done.code, done.message) == (Code.BAD_INPUT, "the signature does not match the config")
    assert freed_under_lock == [True]


def test_a_version_replaced_during_a_failing_call_is_freed_under_the_lock(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload swaps the version while one of its calls runs, and that call fails: the
    call's reference (and its traceback's) is the last one, and goes under the lock."""
    # pytest's log capture keeps every record, and an exception record its traceback.
    monkeypatch.setattr(logging.getLogger("microtune.worker"), "disabled", True)
    freed_under_lock: list[bool] = []
    lock: Any = worker.device_lock
    key = ("dense", 1)

    class Session:  # stands in for the onnxruntime session of the replaced version
        pass

    class Version:
        def __init__(self) -> None:
            self.session = Session()
            weakref.finalize(self.session, lambda: freed_under_lock.append(lock._is_owned()))

        def execute(self, *args: object) -> InferDone:
            worker.models[key] = None  # type: ignore[assignment]  # replaced meanwhile
            raise RuntimeError("the session failed")

    worker.models[key] = Version()  # type: ignore[assignment]
    ours, theirs = socket.socketpair()
    try:
        conn = Connection(worker, ours)
        conn.arena = SimpleNamespace(buf=memoryview(bytearray(64)))  # type: ignore[assignment]
        conn._infer(Infer(7, "dense", 1, (), (), 0, 0), time.monotonic_ns())
        done = decode_worker(theirs.recv(4096)[4:])
        assert isinstance(done, InferDone)
        assert (done.call_id, done.code, done.message) == (7, Code.INTERNAL, "RuntimeError")
        assert freed_under_lock == [True]
    finally:
        ours.close()
        theirs.close()
