"""The worker's GPU lock around what frees a plain CUDA session (runtime.worker): on a GPU a
session's destruction (cudaFree, stream and handle teardown) must never run during another
version's graph capture, so it happens under the lock wherever the last reference goes. On
the CPU there is no lock; these tests stand the worker's device lock in as its GPU lock."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnxruntime as ort
import pytest
from worker_frames import read_frame

from runtime.engine.session import SessionError
from runtime.ipc.protocol import (
    Cancel,
    CloseRegion,
    Code,
    Infer,
    InferDone,
    LoadModel,
    ModelSignature,
    OutputRequest,
    RegionDone,
    TensorRef,
    UnloadDone,
    UnloadModel,
)
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from runtime.worker_connection import Connection
from server.settings import DEMO_REPOSITORY

DENSE = DEMO_REPOSITORY / "dense" / "1" / "model.onnx"


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    sock = str(tmp_path / "w.sock")
    settings = WorkerSettings(socket_path=sock, device="cpu", fake_cuda_ipc=True)
    w = Worker(settings)
    w.gpu_lock = w.device_lock  # as on a CUDA worker
    yield w
    w.close_lanes()


def test_a_failed_load_frees_its_session_under_the_lock(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error's traceback holds the failed load's frame, and its session with it: the
    worker handles the error inside the lock, so the session goes there."""
    freed_under_lock: list[bool] = []
    lock: Any = worker.device_lock

    def failing_load(msg: LoadModel, device: str, path: str | None = None) -> object:
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
        done = _answer(theirs)
        assert (done.call_id, done.code, done.message) == (7, Code.INTERNAL, "RuntimeError")
        assert freed_under_lock == [True]
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("cancelled", [7, 8], ids=["last-runs", "last-cancelled"])
def test_a_version_replaced_while_calls_wait_on_its_lane_is_freed_under_the_lock(
    worker: Worker, cancelled: int
) -> None:
    """Calls queued on a version's lane hold the instance they were accepted for: a reload
    meanwhile leaves the last of them (the lane has one thread: call 8) the last reference to
    the old one, which goes under the lock whether that call runs or was cancelled while it
    waited."""
    key = ("dense", 1)
    freed_under_lock: list[bool] = []
    lock: Any = worker.device_lock

    def load(request_id: int, revision: str) -> None:
        msg = LoadModel(
            request_id, "dense", 1, str(DENSE), 8, ModelSignature((), ()), revision=revision,
            instances=1,
        )  # fmt: skip
        assert worker.load(msg).code == Code.OK

    load(1, "r1")
    session = worker.models[key].session  # (freed with the instance: nothing else holds it)
    weakref.finalize(session, lambda: freed_under_lock.append(lock._is_owned()))
    del session
    busy = threading.Event()
    assert worker.lanes[key].submit(busy.wait, 30)  # the lane's one thread: the calls wait
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    try:
        conn = Connection(worker, ours)
        conn.arena = SimpleNamespace(buf=memoryview(bytearray(64)))  # type: ignore[assignment]
        for call_id in (7, 8):
            conn.run_alone(Infer(call_id, "dense", 1, (), (), 0, 0), time.monotonic_ns())
        conn.cancel(Cancel(cancelled, "dense", 1))
        assert _answer(theirs).code == Code.CANCELLED
        load(2, "r2")
        assert freed_under_lock == []  # the queued calls hold it
        busy.set()
        assert _answer(theirs).call_id == 15 - cancelled  # (the one not cancelled)
        deadline = time.monotonic() + 10
        while not freed_under_lock and time.monotonic() < deadline:
            time.sleep(0.01)
        assert freed_under_lock == [True]
    finally:
        busy.set()
        ours.close()
        theirs.close()


def _answer(sock: socket.socket) -> InferDone:
    done = read_frame(sock)
    assert isinstance(done, InferDone)
    return done


@contextlib.contextmanager
def _device_held(worker: Worker) -> Iterator[None]:
    """Another thread holds the device lock (as a load or a capture does) until the block ends."""
    held, release = threading.Event(), threading.Event()

    def load() -> None:
        with worker.device_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=load)
    holder.start()
    try:
        assert held.wait(10)
        yield
    finally:
        release.set()
        holder.join()


def _returns_promptly(fn: Any, *args: Any) -> None:
    reader = threading.Thread(target=fn, args=args)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "the reader thread waited for the device"


def _nothing_yet(sock: socket.socket) -> None:
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(1)
    sock.settimeout(10)


@pytest.fixture
def fast_dense(worker: Worker) -> Iterator[tuple[Connection, socket.socket, Infer]]:
    """`dense` loaded and fast enough to run on the reader thread, a connection to it, and a
    call (its input is zeros in the connection's arena)."""
    ours, theirs = socket.socketpair()
    conn = Connection(worker, ours)
    loaded = worker.load(LoadModel(1, "dense", 1, str(DENSE), 8, ModelSignature((), ())), conn)
    assert loaded.code == Code.OK, loaded.message
    conn.arena = SimpleNamespace(buf=memoryview(bytearray(8192)))  # type: ignore[assignment]
    call = Infer(
        7,
        "dense",
        1,
        (TensorRef("INPUT0", "FP32", (1, 256), 0, 1024),),
        (OutputRequest("OUTPUT0"),),
        1024,
        4096,
    )
    worker.models[("dense", 1)].inline.measured(0, call)  # seen to be fast at this size
    theirs.settimeout(10)
    yield conn, theirs, call
    ours.close()
    theirs.close()


def test_a_fast_call_runs_on_the_reader_when_the_device_is_free(
    fast_dense: tuple[Connection, socket.socket, Infer],
) -> None:
    conn, theirs, call = fast_dense
    ran_on: list[str] = []
    execute = conn._execute

    def recording(*args: Any) -> InferDone:
        ran_on.append(threading.current_thread().name)
        return execute(*args)

    conn._execute = recording  # type: ignore[method-assign]
    conn._dispatch(call, time.monotonic_ns())
    done = _answer(theirs)
    assert (done.call_id, done.code) == (7, Code.OK)
    assert ran_on == [threading.current_thread().name]


def test_the_reader_does_not_wait_while_a_load_holds_the_device(
    worker: Worker, fast_dense: tuple[Connection, socket.socket, Infer]
) -> None:
    """A load (or a capture) holds the device lock for as long as it takes: the call is handed
    to a pool thread, which waits for the lock, and the reader goes on reading."""
    conn, theirs, call = fast_dense
    with _device_held(worker):
        _returns_promptly(conn._dispatch, call, time.monotonic_ns())
        _nothing_yet(theirs)  # nothing runs on the device while the load holds it
    done = _answer(theirs)
    assert (done.call_id, done.code) == (7, Code.OK)


@pytest.mark.parametrize(
    ("msg", "answer"),
    [
        (UnloadModel(3, "dense", 1), UnloadDone(3)),
        (CloseRegion(3, "region"), RegionDone(3, Code.OK)),
    ],
    ids=["unload", "close-region"],
)
def test_unloads_and_regions_wait_for_the_device_off_the_reader(
    worker: Worker,
    fast_dense: tuple[Connection, socket.socket, Infer],
    msg: object,
    answer: object,
) -> None:
    """Both take the device lock (a session freed, an IPC handle closed): a control thread
    waits for it, in order, and answers once the load is over."""
    conn, theirs, _call = fast_dense
    with _device_held(worker):
        _returns_promptly(conn._handle, msg)
        _returns_promptly(conn._handle, msg)  # a second one queues behind the first
        _nothing_yet(theirs)
    assert read_frame(theirs) == answer
    assert read_frame(theirs) == answer
    conn._control.shutdown()
