"""runtime.engine.regions: the worker's table of client CUDA shared-memory regions.

An in-memory opener stands in for cudaIpcOpenMemHandle; what is checked is the table's own
contract: handle and size checks, one namespace, and that memory in use by a call is closed
only after the call releases it (an unregister racing an inference never frees its memory),
and that `SharedOpener` opens a handle once per process however many regions name it (CUDA
refuses a second open of a handle still open, and so do these openers).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from runtime.engine.regions import (
    IPC_HANDLE_BYTES,
    RegionError,
    RegionTable,
    SharedOpener,
    fake_handle,
    fake_opener,
    host_copier,
)
from runtime.ipc.pinning import check_ipc_size


@dataclass
class Memory:
    ptr: int
    size: int
    device_id: int
    handle: bytes = b""
    allocation_size: int = 4096
    closed: int = 0

    def close(self) -> None:
        self.closed += 1


class Opener:
    def __init__(self) -> None:
        self.opened: list[Memory] = []

    def __call__(self, handle: bytes, device_id: int, byte_size: int) -> Memory:
        if handle == bytes(IPC_HANDLE_BYTES):
            raise RuntimeError("invalid argument")  # what CudaError says for garbage
        if byte_size > 4096:
            check_ipc_size(4096, byte_size)
        if any(m.handle == handle and not m.closed for m in self.opened):
            raise RuntimeError("resource already mapped")  # what CUDA says
        m = Memory(0x7000 + 0x1000 * len(self.opened), byte_size, device_id, handle)
        self.opened.append(m)
        return m


H = bytes(range(IPC_HANDLE_BYTES))
H2 = bytes(range(1, IPC_HANDLE_BYTES + 1))


def table() -> tuple[RegionTable, Opener]:
    opener = Opener()
    return RegionTable(opener, host_copier), opener


def test_register_acquire_release_unregister() -> None:
    t, opener = table()
    t.register("a", H, 0, 1024)
    assert t.names() == ["a"]
    use = t.acquire("a")
    assert use.memory.size == 1024 and use.memory.ptr == 0x7000
    t.release(use)
    t.unregister("a")
    assert opener.opened[0].closed == 1 and t.names() == []


def test_memory_in_use_closes_after_its_last_call() -> None:
    t, opener = table()
    t.register("a", H, 0, 64)
    first, second = t.acquire("a"), t.acquire("a")
    t.unregister("a")
    assert t.names() == []
    with pytest.raises(RegionError, match="unable to find CUDA shared memory region 'a'"):
        t.acquire("a")  # a new call no longer finds it
    t.release(first)
    assert opener.opened[0].closed == 0  # the second call still reads it
    t.release(second)
    assert opener.opened[0].closed == 1


def test_same_name_registered_again_after_unregister_is_new_memory() -> None:
    t, opener = table()
    t.register("a", H, 0, 64)
    old = t.acquire("a")
    t.unregister("a")
    t.register("a", H2, 0, 128)
    new = t.acquire("a")
    assert new.memory is opener.opened[1]
    t.release(old)
    assert opener.opened[0].closed == 1 and opener.opened[1].closed == 0
    t.release(new)
    t.close()
    assert opener.opened[1].closed == 1


@pytest.mark.parametrize(
    ("name", "handle", "size", "needle"),
    [
        ("s", H[:63], 64, "CUDA IPC handle of region 's' is 63 bytes; a cudaIpcMemHandle_t is 64"),
        ("z", H, 0, "'z': byte_size must be positive"),
        ("g", bytes(64), 64, "failed to open CUDA IPC handle of shared memory region 'g'"),
        ("b", H, 8192, "'b': the handle's allocation has 4096 bytes from its address; 8192"),
    ],
)
def test_registration_errors(name: str, handle: bytes, size: int, needle: str) -> None:
    t, opener = table()
    with pytest.raises(RegionError) as ei:
        t.register(name, handle, 0, size)
    assert needle in str(ei.value)
    assert t.names() == [] and opener.opened == []


def test_duplicate_name_is_refused_and_nothing_leaks() -> None:
    t, opener = table()
    t.register("a", H, 0, 64)
    with pytest.raises(RegionError, match="'a' already in manager"):
        t.register("a", H, 0, 64)
    assert len(opener.opened) == 1


def test_unregister_all_and_concurrent_users() -> None:
    t, opener = table()
    for i, n in enumerate("abc"):
        t.register(n, bytes([i + 1]) * IPC_HANDLE_BYTES, 0, 64)
    stop = threading.Event()
    errors: list[BaseException] = []

    def user() -> None:
        while not stop.is_set():
            try:
                use = t.acquire("b")
            except RegionError:
                return
            try:
                assert opener.opened[1].closed == 0  # never closed under a user
            except BaseException as exc:
                errors.append(exc)
            t.release(use)

    threads = [threading.Thread(target=user) for _ in range(4)]
    for th in threads:
        th.start()
    t.unregister("")
    stop.set()
    for th in threads:
        th.join(5)
    assert not errors
    assert [m.closed for m in opener.opened] == [1, 1, 1]


def test_fake_opener_maps_the_named_shm_object() -> None:
    name = f"mt-unit-fake-{os.getpid()}"
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 256)
        os.pwrite(fd, b"\x07" * 16, 32)
        t = RegionTable(fake_opener, host_copier)
        t.register("f", fake_handle(name), 0, 256)
        use = t.acquire("f")
        dst = np.zeros(16, np.uint8)
        host_copier.copy(dst.ctypes.data, use.memory.ptr + 32, 16, 0)
        assert dst.tolist() == [7] * 16
        t.release(use)
        with pytest.raises(RegionError, match=r"'g'.*resource already mapped"):
            t.register("g", fake_handle(name), 0, 64)  # open in this process: refused like CUDA
        t.close()
        with pytest.raises(RegionError, match="257 bytes were registered"):
            t.register("g", fake_handle(name), 0, 257)
        t.register("g", fake_handle(name), 0, 64)  # closed, so it opens again
        t.close()
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm/{name}")


def shared() -> tuple[SharedOpener, Opener]:
    opener = Opener()
    return SharedOpener(opener), opener


def test_one_handle_under_two_names_is_opened_once() -> None:
    so, opener = shared()
    t = RegionTable(so, host_copier)
    t.register("in", H, 0, 1024)
    t.register("out", H, 0, 4096)  # the same allocation, its whole size
    a, b = t.acquire("in"), t.acquire("out")
    assert len(opener.opened) == 1 and so.open_handles() == 1
    assert (a.memory.ptr, a.memory.size) == (0x7000, 1024)
    assert (b.memory.ptr, b.memory.size) == (0x7000, 4096)
    t.release(a)
    t.release(b)
    t.unregister("in")
    assert opener.opened[0].closed == 0  # "out" still maps it
    t.unregister("out")
    assert opener.opened[0].closed == 1 and so.open_handles() == 0


def test_unregister_and_register_again_while_a_call_holds_the_old_mapping() -> None:
    # The raw opener refuses this second open (CUDA: "already mapped") while the call runs.
    so, opener = shared()
    t = RegionTable(so, host_copier)
    t.register("a", H, 0, 64)
    held = t.acquire("a")
    t.unregister("a")
    t.register("a", H, 0, 128)
    new = t.acquire("a")
    assert new.memory.ptr == held.memory.ptr and len(opener.opened) == 1
    t.release(held)
    assert opener.opened[0].closed == 0
    t.release(new)
    t.close()
    assert opener.opened[0].closed == 1


def test_tables_of_two_fronts_share_the_mapping() -> None:
    so, opener = shared()
    one, two = RegionTable(so, host_copier), RegionTable(so, host_copier)
    one.register("x", H, 0, 64)
    two.register("x", H, 0, 64)  # names are per front
    assert len(opener.opened) == 1
    one.close()
    assert opener.opened[0].closed == 0
    two.close()
    assert opener.opened[0].closed == 1


@pytest.mark.parametrize(
    ("device", "size", "needle"),
    [
        (1, 64, "'b': the handle is memory of device 0, not device 1"),
        (0, 8192, "'b': the handle's allocation has 4096 bytes from its address; 8192 bytes"),
    ],
)
def test_a_handle_already_open_is_checked_like_a_first_open(
    device: int, size: int, needle: str
) -> None:
    so, opener = shared()
    t = RegionTable(so, host_copier)
    t.register("a", H, 0, 64)
    with pytest.raises(RegionError) as ei:
        t.register("b", H, device, size)
    assert needle in str(ei.value)
    assert t.names() == ["a"]
    t.close()
    assert opener.opened[0].closed == 1 and so.open_handles() == 0


def test_a_failed_first_open_leaves_nothing() -> None:
    so, opener = shared()
    t = RegionTable(so, host_copier)
    with pytest.raises(RegionError, match="failed to open CUDA IPC handle"):
        t.register("g", bytes(IPC_HANDLE_BYTES), 0, 64)
    assert so.open_handles() == 0
    t.register("g", H, 0, 64)
    t.close()
    assert opener.opened[0].closed == 1


def test_the_last_close_runs_under_the_device_lock() -> None:
    """The last release of an unregistered region may come from any thread; its CUDA close
    must not land inside another version's graph capture, so it takes the device lock (a
    reentrant one: an unregister already holds it)."""
    device_lock = threading.RLock()
    depth = 0
    seen: list[int] = []

    class Tracking:
        def __enter__(self) -> None:
            nonlocal depth
            device_lock.acquire()
            depth += 1

        def __exit__(self, *exc: object) -> None:
            nonlocal depth
            depth -= 1
            device_lock.release()

    class Recording(Opener):
        def __call__(self, handle: bytes, device_id: int, byte_size: int) -> Memory:
            m = super().__call__(handle, device_id, byte_size)
            m.close = lambda: seen.append(depth)  # type: ignore[method-assign]
            return m

    lock = Tracking()
    t = RegionTable(SharedOpener(Recording(), lock), host_copier)  # type: ignore[arg-type]
    t.register("a", H, 0, 64)
    t.register("b", H2, 0, 64)
    use = t.acquire("a")
    with lock:  # the worker's unregister path holds it already: reentrant
        t.unregister("")
    assert seen == [2]  # "b" closed at once, inside the caller's hold and its own
    worker = threading.Thread(target=t.release, args=(use,))  # a call's thread, lock-free
    worker.start()
    worker.join(5)
    assert seen == [2, 1]
