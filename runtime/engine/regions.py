"""Client CUDA shared-memory regions opened in the worker (Triton's CUDA shared-memory extension).

A client allocates device memory, exports a 64-byte CUDA IPC handle and registers it with a
front; the front forwards it here, and the worker (the process that owns the CUDA context)
opens it. Inference calls then name the region in their `TensorRef`/`OutputRequest`: inputs
are bound to onnxruntime straight from the region's device pointer and outputs are copied
device to device into it (runtime.engine.bound), so no tensor makes a host round trip.

One `RegionTable` per front connection: names are the front's (Triton's namespace is per
server, and a client talks to one front over its channel). A region in use by a running call
is closed only after that call releases it, so an unregister racing an inference never frees
memory under onnxruntime.

CUDA maps an IPC handle once per process: older drivers refuse a second cudaIpcOpenMemHandle of
a handle still open (CUDA_ERROR_ALREADY_MAPPED), current ones hand back the same pointer and
count the opens, so that one close unmaps nothing while another open remains. One allocation
can stand behind several regions: two names for one buffer, one buffer registered through two
fronts, or a name unregistered and registered again while a call still holds the old mapping.
`SharedOpener` (one per worker, under every table) opens each handle once and closes it when
its last region lets go: right under both behaviours, and a close is then a real unmap.

Openers: `cuda_opener` (runtime.ipc.pinning.open_cuda_ipc_handle, cupy) on a CUDA worker, none
on a CPU worker (registration answers "no CUDA device"), and `fake_opener` for CPU-only tests
(`fake_cuda_ipc`): the "handle" names a POSIX shm object that stands in for device memory, so
the CPU test suite drives the same registration, binding and copy code with host pointers.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np

from runtime.ipc.pinning import (  # imports no cupy until a function is called
    IPC_HANDLE_BYTES,
    check_ipc_device,
    check_ipc_size,
    copy_on_device,
    copy_to_device,
    open_cuda_ipc_handle,
    synchronize_device,
    zero_on_device,
)

__all__ = [
    "FAKE_HANDLE_PREFIX",
    "IPC_HANDLE_BYTES",
    "Copier",
    "Held",
    "OpenedMemory",
    "Opener",
    "RegionError",
    "RegionTable",
    "RegionUse",
    "SharedOpener",
    "cuda_copier",
    "cuda_opener",
    "fake_handle",
    "fake_opener",
    "hold",
    "host_copier",
]

FAKE_HANDLE_PREFIX: Final = b"microtune-fake-ipc:"


class RegionError(ValueError):
    """A register/unregister/lookup the client got wrong: its message goes back as
    INVALID_ARGUMENT (or NOT_FOUND for an unknown name, decided by the front)."""


class OpenedMemory(Protocol):
    """Memory behind an opened handle: `ptr` is its base address in this process, `size` the
    registered byte size, `allocation_size` the bytes from `ptr` to the end of the exporter's
    allocation (>= size)."""

    ptr: int
    size: int
    device_id: int
    allocation_size: int

    def close(self) -> None: ...


# (raw handle, device id, byte size) -> opened memory; raises ValueError or CudaError.
Opener = Callable[[bytes, int, int], OpenedMemory]


class Copier(Protocol):
    """Copies between a region and onnxruntime's buffers in the region's memory space."""

    device_type: str  # what onnxruntime calls that memory: "cuda" or, for the fake, "cpu"

    def copy(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        """Device to device (queued: `synchronize` waits for it)."""
        ...

    def upload(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        """Host memory at `src` to device memory at `dst`."""
        ...

    def zero(self, dst: int, nbytes: int, device_id: int) -> None:
        """Device memory at `dst` set to zero bytes (queued like `copy`)."""
        ...

    def synchronize(self, device_id: int) -> None: ...


@dataclass(slots=True)
class RegionUse:
    """A registered region; what `RegionTable.acquire` hands out (give it back to `release`)."""

    name: str
    memory: OpenedMemory
    users: int = 0
    closing: bool = False


@dataclass(slots=True)
class RegionTable:
    """The regions one front registered. Thread-safe: the connection's control thread
    registers and closes, execution threads acquire and release."""

    opener: Opener
    copier: Copier
    _entries: dict[str, RegionUse] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, name: str, handle: bytes, device_id: int, byte_size: int) -> None:
        if len(handle) != IPC_HANDLE_BYTES:
            raise RegionError(
                f"CUDA IPC handle of region '{name}' is {len(handle)} bytes; "
                f"a cudaIpcMemHandle_t is {IPC_HANDLE_BYTES}"
            )
        if byte_size < 1:
            raise RegionError(f"CUDA shared memory region '{name}': byte_size must be positive")
        with self._lock:
            if name in self._entries:
                raise RegionError(f"shared memory region '{name}' already in manager")
        try:
            memory = self.opener(handle, device_id, byte_size)
        except ValueError as exc:
            raise RegionError(
                f"failed to register CUDA shared memory region '{name}': {exc}"
            ) from None
        except OSError as exc:  # the fake opener's shm object is missing
            raise RegionError(
                f"failed to open CUDA IPC handle of shared memory region '{name}': {exc.strerror}"
            ) from None
        except RuntimeError as exc:  # CudaError: CUDA refused the handle
            raise RegionError(
                f"failed to open CUDA IPC handle of shared memory region '{name}': {exc}"
            ) from None
        with self._lock:
            if name in self._entries:  # registered meanwhile by another call
                memory.close()
                raise RegionError(f"shared memory region '{name}' already in manager")
            self._entries[name] = RegionUse(name, memory)

    def unregister(self, name: str) -> None:
        """Forget `name` ("" = every region); memory in use closes when its last call ends."""
        with self._lock:
            names = list(self._entries) if not name else [name]
            gone = [e for e in (self._entries.pop(n, None) for n in names) if e is not None]
            for e in gone:
                e.closing = True
            idle = [e for e in gone if e.users == 0]
        for e in idle:
            e.memory.close()

    def acquire(self, name: str) -> RegionUse:
        """The region `name`, held open until `release` (a call runs on it meanwhile)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise RegionError(f"unable to find CUDA shared memory region '{name}'")
            entry.users += 1
            return entry

    def release(self, use: RegionUse) -> None:
        with self._lock:
            use.users -= 1
            last = use.closing and use.users == 0
        if last:
            use.memory.close()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        self.unregister("")


class Held:
    """The regions one call uses, held open (`use`) until its answer (`release`)."""

    __slots__ = ("regions", "uses")

    def __init__(self, regions: RegionTable) -> None:
        self.regions = regions
        self.uses: dict[str, RegionUse] = {}

    def use(self, name: str) -> RegionUse:
        """Region `name`, acquired once per call however many of its tensors live there."""
        use = self.uses.get(name)
        if use is None:
            use = self.uses[name] = self.regions.acquire(name)
        return use

    def release(self) -> None:
        uses, self.uses = self.uses, {}
        for use in uses.values():
            self.regions.release(use)


def hold(regions: RegionTable | None) -> Held:
    """A call's holder over its front's regions; RegionError when the front has none (a CPU
    worker's connection: the front never registers any, so a bound call is malformed)."""
    if regions is None:
        raise RegionError("this call names CUDA shared memory, but its front has none")
    return Held(regions)


class _Mapping:
    __slots__ = ("memory", "regions")

    def __init__(self, memory: OpenedMemory) -> None:
        self.memory = memory
        self.regions = 0


class _SharedView:
    """One region's view of a shared mapping; `close` lets go of the mapping once."""

    __slots__ = ("_handle", "_owner", "allocation_size", "device_id", "ptr", "size")

    def __init__(self, owner: SharedOpener, handle: bytes, base: OpenedMemory, size: int) -> None:
        self._owner: SharedOpener | None = owner
        self._handle = handle
        self.ptr = base.ptr
        self.size = size
        self.device_id = base.device_id
        self.allocation_size = base.allocation_size

    def close(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.let_go(self._handle)


class SharedOpener:
    """An `Opener` that opens each handle once per process, whatever number of regions (of any
    front) name it, and closes it when the last of them closes. Thread-safe; opens and closes
    run under its lock, so a handle is never opened while its last close is still under way.

    `device_lock` (the worker's, reentrant) is taken around a close: the last release of an
    unregistered region may come from any thread, and cudaIpcCloseMemHandle during another
    version's graph capture would break that capture. Opens already run under it (the
    connection's control thread), so the order is always the device lock, then this one's."""

    def __init__(
        self, opener: Opener, device_lock: AbstractContextManager[Any] | None = None
    ) -> None:
        self._opener = opener
        self._device_lock = device_lock if device_lock is not None else nullcontext()
        self._open: dict[bytes, _Mapping] = {}
        self._lock = threading.Lock()

    def __call__(self, handle: bytes, device_id: int, byte_size: int) -> OpenedMemory:
        handle = bytes(handle)
        with self._lock:
            mapping = self._open.get(handle)
            if mapping is None:
                mapping = self._open[handle] = _Mapping(self._opener(handle, device_id, byte_size))
            else:  # the checks of a first open, against the mapping already open
                check_ipc_device(mapping.memory.device_id, device_id)
                check_ipc_size(mapping.memory.allocation_size, byte_size)
            mapping.regions += 1
            return _SharedView(self, handle, mapping.memory, byte_size)

    def let_go(self, handle: bytes) -> None:
        with self._device_lock, self._lock:
            mapping = self._open[handle]
            mapping.regions -= 1
            if mapping.regions == 0:
                del self._open[handle]
                mapping.memory.close()

    def open_handles(self) -> int:
        with self._lock:
            return len(self._open)


# ----------------------------------------------------------------------------- real CUDA


cuda_opener: Final[Opener] = open_cuda_ipc_handle


class _CudaCopier:
    device_type = "cuda"

    def copy(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        copy_on_device(dst, src, nbytes, device_id)

    def upload(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        copy_to_device(dst, src, nbytes, device_id)

    def zero(self, dst: int, nbytes: int, device_id: int) -> None:
        zero_on_device(dst, nbytes, device_id)

    def synchronize(self, device_id: int) -> None:
        synchronize_device(device_id)


cuda_copier: Final[Copier] = _CudaCopier()


# ----------------------------------------------------------------------------- CPU stand-in


def fake_handle(shm_name: str) -> bytes:
    """The 64-byte stand-in handle `fake_opener` opens: the name of a POSIX shm object."""
    raw = FAKE_HANDLE_PREFIX + shm_name.lstrip("/").encode()
    if len(raw) > IPC_HANDLE_BYTES:
        raise ValueError(f"shm name '{shm_name}' is too long for a fake handle")
    return raw.ljust(IPC_HANDLE_BYTES, b"\0")


# Fake handles mapped in this process: a second open of one still open is refused, as older
# CUDA drivers do (current ones count it), so the CPU tests catch a path that opens twice.
_fake_open: set[bytes] = set()
_fake_lock = threading.Lock()


@dataclass(slots=True)
class _MappedShm:
    ptr: int
    size: int
    device_id: int
    allocation_size: int
    _handle: bytes
    _map: mmap.mmap
    _view: np.ndarray  # keeps the address stable; dropped before the map closes

    def close(self) -> None:
        self._view = np.empty(0, np.uint8)
        self._map.close()
        with _fake_lock:
            _fake_open.discard(self._handle)


def fake_opener(handle: bytes, device_id: int, byte_size: int) -> OpenedMemory:
    """Map the POSIX shm object a `fake_handle` names, as if it were device memory."""
    if not handle.startswith(FAKE_HANDLE_PREFIX):
        raise RuntimeError("invalid argument (not a handle this test worker can open)")
    name = handle[len(FAKE_HANDLE_PREFIX) :].rstrip(b"\0").decode()
    with _fake_lock:
        if handle in _fake_open:
            raise RuntimeError("resource already mapped (the handle is open in this process)")
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            check_ipc_size(size, byte_size)
            m = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        _fake_open.add(handle)
    view = np.frombuffer(m, np.uint8)
    return _MappedShm(view.ctypes.data, byte_size, device_id, size, handle, m, view)


class _HostCopier:
    device_type = "cpu"

    def copy(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def upload(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def zero(self, dst: int, nbytes: int, device_id: int) -> None:
        ctypes.memset(dst, 0, nbytes)

    def synchronize(self, device_id: int) -> None:
        pass


host_copier: Final[Copier] = _HostCopier()
