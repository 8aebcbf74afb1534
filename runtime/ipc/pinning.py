"""Worker-only CUDA host-memory helpers: page-lock (hostRegister) a shared-memory arena, allocate
pinned staging buffers, open Triton CUDA shared-memory IPC handles; and read how much device
memory is in use (the probe that attributes device memory to model loads).

Allowed imports: stdlib and numpy at import time; cupy (and the driver library libcuda.so.1,
through ctypes) only inside functions, so this module imports on a machine without CUDA and
the front never loads cupy (.importlinter). Every CUDA call goes through `call_cuda`, the one
place CUDA failures become `CudaError` (Triton client's `call_cuda_function` pattern). Every
resource is released by an explicit `close()` (or `with`), never by `__del__`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator
from types import ModuleType, TracebackType
from typing import Any, Final, Self, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "HOST_REGISTER_PORTABLE",
    "CudaError",
    "CudaIpcRegion",
    "PinnedBuffer",
    "PinnedRegion",
    "alloc_pinned",
    "call_cuda",
    "check_ipc_device",
    "check_ipc_size",
    "copy_on_device",
    "copy_to_device",
    "cuda_available",
    "cuda_runtime",
    "device_memory_used",
    "is_pinned",
    "open_cuda_ipc_handle",
    "pin_arena",
    "synchronize_device",
    "zero_on_device",
]

T = TypeVar("T")

# cupy exports no constants for these (CUDA runtime API values).
HOST_REGISTER_PORTABLE: Final = 1  # cudaHostRegisterPortable: pinned for every CUDA context
_DEV_ATTR_HOST_REGISTER_SUPPORTED: Final = 99  # cudaDevAttrHostRegisterSupported
_IPC_LAZY_ENABLE_PEER_ACCESS: Final = 1  # cudaIpcMemLazyEnablePeerAccess
IPC_HANDLE_BYTES: Final = 64  # cudaIpcMemHandle_t


class CudaError(RuntimeError):
    """A CUDA call failed (or CUDA is not usable here). `code` is the CUDA status when known."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class _DriverCallFailed(Exception):
    """A driver API call made through ctypes returned a CUresult other than CUDA_SUCCESS."""

    def __init__(self, status: int, name: str) -> None:
        super().__init__(f"{name} ({status})")
        self.status = status


@functools.cache
def _cuda_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [_DriverCallFailed]
    with contextlib.suppress(Exception):
        from cupy_backends.cuda.api.runtime import CUDARuntimeError

        types.append(CUDARuntimeError)
    with contextlib.suppress(Exception):
        from cupy_backends.cuda.api.driver import CUDADriverError

        types.append(CUDADriverError)
    return tuple(types)


def call_cuda(fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)`; a CUDA failure (cupy's runtime/driver errors, a failed driver call)
    becomes CudaError naming the call and its arguments. Other exceptions (a wrong argument
    type is a bug, not a CUDA state) pass through unchanged."""
    try:
        return fn(*args)
    except _cuda_error_types() as exc:
        name = getattr(fn, "__name__", repr(fn))
        status = getattr(exc, "status", None)
        raise CudaError(
            f"CUDA call {name}({_format_args(args)}) failed: {exc}",
            status if isinstance(status, int) else None,
        ) from exc


def _format_args(args: tuple[Any, ...]) -> str:
    shown: list[str] = []
    for a in args:
        if isinstance(a, bytes | bytearray):
            shown.append(f"<{len(a)} bytes>")
        elif isinstance(a, int) and not isinstance(a, bool) and a >= 1 << 16:
            shown.append(hex(a))  # pointers and sizes read better in hex
        else:
            shown.append(repr(a)[:40])
    return ", ".join(shown)


def _runtime() -> ModuleType:
    """cupy's CUDA runtime module, or CudaError saying why CUDA is not usable here."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        raise CudaError(f"CUDA is not available: cannot import cupy ({exc})") from exc
    runtime: ModuleType = cupy.cuda.runtime
    return runtime


def cuda_runtime() -> ModuleType:
    """cupy's CUDA runtime module (for callers that queue their own calls through `call_cuda`),
    or CudaError saying why CUDA is not usable here."""
    return _runtime()


def cuda_available() -> bool:
    """True when cupy imports and sees at least one CUDA device; never raises."""
    try:
        return int(call_cuda(_runtime().getDeviceCount)) > 0
    except CudaError:
        return False


def device_memory_used(device_id: int) -> int:
    """Bytes of device `device_id`'s memory in use now, by every process and context
    (cudaMemGetInfo: total - free). Raises CudaError when CUDA is not usable here."""
    with _on_device(device_id) as rt:
        free, total = call_cuda(rt.memGetInfo)
    return int(total) - int(free)


_MEMCPY_HOST_TO_DEVICE: Final = 1  # cudaMemcpyHostToDevice
_MEMCPY_DEVICE_TO_DEVICE: Final = 3  # cudaMemcpyDeviceToDevice


def copy_on_device(dst: int, src: int, nbytes: int, device_id: int) -> None:
    """Queue a device-to-device copy of `nbytes` on the legacy default stream of `device_id`
    (cudaMemcpy does not wait for a device-to-device copy: `synchronize_device` does)."""
    with _on_device(device_id) as rt:
        call_cuda(rt.memcpy, dst, src, nbytes, _MEMCPY_DEVICE_TO_DEVICE)


def copy_to_device(dst: int, src: int, nbytes: int, device_id: int) -> None:
    """cudaMemcpy host (`src`) to device (`dst`). From pageable memory it may return before the
    DMA ends (the source is already staged): `synchronize_device` before reading `dst`."""
    with _on_device(device_id) as rt:
        call_cuda(rt.memcpy, dst, src, nbytes, _MEMCPY_HOST_TO_DEVICE)


def zero_on_device(dst: int, nbytes: int, device_id: int) -> None:
    """cudaMemset to zero on the legacy default stream (asynchronous for device memory)."""
    with _on_device(device_id) as rt:
        call_cuda(rt.memset, dst, 0, nbytes)


def synchronize_device(device_id: int) -> None:
    """Wait for the copies queued by `copy_on_device` (the legacy default stream)."""
    with _on_device(device_id) as rt:
        call_cuda(rt.streamSynchronize, 0)


@contextlib.contextmanager
def _on_device(device_id: int) -> Iterator[ModuleType]:
    """Make `device_id` current for the calls inside, then restore the previous device."""
    rt = _runtime()
    previous = call_cuda(rt.getDevice)
    if previous != device_id:
        call_cuda(rt.setDevice, device_id)
    try:
        yield rt
    finally:
        if previous != device_id:
            call_cuda(rt.setDevice, previous)


def _address_of(buf: memoryview) -> int:
    # A numpy view exports the buffer only while it lives: take the address and drop it, so
    # that the arena's close() is not refused with BufferError because of us.
    view = np.frombuffer(buf, dtype=np.uint8)
    try:
        return int(view.ctypes.data)
    finally:
        del view


class _Released:
    """A CUDA resource released once by `close()` (idempotent), also as a context manager.
    Subclasses set `closed = False` and implement `_release()`."""

    closed: bool

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.closed:
            return
        self._release()
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PinnedRegion(_Released):
    """Host memory we page-locked with cudaHostRegister; `close()` unregisters it.

    Close it before the memory goes away (for an arena: before `Arena.close()`): unmapping a
    registered range leaves the driver with a stale registration."""

    def __init__(self, ptr: int, size: int, device_id: int, flags: int) -> None:
        self.ptr = ptr
        self.size = size
        self.device_id = device_id
        self.flags = flags
        self.closed = False

    def _release(self) -> None:
        with _on_device(self.device_id) as rt:
            call_cuda(rt.hostUnregister, self.ptr)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "pinned"
        return f"PinnedRegion({self.ptr:#x}, {self.size} bytes, device {self.device_id}, {state})"


def pin_arena(
    buf: memoryview, *, device_id: int = 0, flags: int = HOST_REGISTER_PORTABLE
) -> PinnedRegion:
    """Page-lock the memory behind `buf` (a shared-memory arena mapping) for DMA.

    Host-to-device copies from a registered range are one DMA, asynchronous with
    cudaMemcpyAsync; from pageable memory the driver stages them through its own bounce buffer.
    Portable (the default flag) makes the range pinned for every CUDA context of this process.
    Raises CudaError when CUDA is unusable, the device cannot register host memory, or the range
    is already registered; ValueError for an empty or non-contiguous buffer."""
    if not buf.contiguous:
        raise ValueError("pin_arena needs a contiguous buffer")
    size = buf.nbytes
    if size == 0:
        raise ValueError("pin_arena needs a non-empty buffer")
    ptr = _address_of(buf)
    with _on_device(device_id) as rt:
        attr = getattr(rt, "cudaDevAttrHostRegisterSupported", _DEV_ATTR_HOST_REGISTER_SUPPORTED)
        if not call_cuda(rt.deviceGetAttribute, attr, device_id):
            raise CudaError(f"device {device_id} does not support cudaHostRegister")
        call_cuda(rt.hostRegister, ptr, size, flags)
    return PinnedRegion(ptr, size, device_id, flags)


def is_pinned(ptr: int) -> bool:
    """Whether CUDA sees host address `ptr` as page-locked (registered or cudaHostAlloc'ed)."""
    _runtime()
    from cupy.cuda import pinned_memory

    return bool(call_cuda(pinned_memory.is_memory_pinned, ptr))


class PinnedBuffer(_Released):
    """Page-locked host memory from cudaHostAlloc, owned until `close()` (cudaFreeHost).

    `array` is a uint8 numpy view of it: views taken from it must not outlive `close()`."""

    def __init__(self, ptr: int, size: int) -> None:
        self.ptr = ptr
        self.size = size
        raw = (ctypes.c_uint8 * size).from_address(ptr)
        self.array: npt.NDArray[np.uint8] = np.ctypeslib.as_array(raw)
        self.pinned = True
        self.closed = False

    def _release(self) -> None:
        self.array = np.empty(0, dtype=np.uint8)  # drop our view before the memory goes
        call_cuda(_runtime().freeHost, self.ptr)


def alloc_pinned(nbytes: int, *, flags: int = HOST_REGISTER_PORTABLE) -> PinnedBuffer:
    """`nbytes` of page-locked host memory (cudaHostAlloc; flag 1 = cudaHostAllocPortable)."""
    if nbytes < 1:
        raise ValueError(f"alloc_pinned needs at least one byte, got {nbytes}")
    ptr = call_cuda(_runtime().hostAlloc, nbytes, flags)
    return PinnedBuffer(int(ptr), nbytes)


class CudaIpcRegion(_Released):
    """Device memory of another process, opened from its CUDA IPC handle (Triton's CUDA shared
    memory). `ptr` is where the handle maps the exporter's buffer; `size` the registered byte
    size, checked against `allocation_size`, the bytes from `ptr` to the end of the allocation;
    `close()` is cudaIpcCloseMemHandle."""

    def __init__(self, ptr: int, size: int, device_id: int, allocation_size: int) -> None:
        self.ptr = ptr
        self.size = size
        self.device_id = device_id
        self.allocation_size = allocation_size
        self.closed = False

    def _release(self) -> None:
        with _on_device(self.device_id) as rt:
            call_cuda(rt.ipcCloseMemHandle, self.ptr)

    def __repr__(self) -> str:
        return (
            f"CudaIpcRegion({self.ptr:#x}, {self.size} of {self.allocation_size} bytes, "
            f"device {self.device_id}{', closed' if self.closed else ''})"
        )


def open_cuda_ipc_handle(raw_handle: bytes, device_id: int, byte_size: int) -> CudaIpcRegion:
    """Open a 64-byte cudaIpcMemHandle_t (the raw bytes Triton's gRPC register request carries)
    on `device_id` and check that the allocation behind it holds `byte_size` bytes.

    ValueError for a handle of the wrong length, a non-positive size, a handle of another
    device, or an allocation smaller than `byte_size`; CudaError when CUDA refuses the handle
    (garbage, already freed, opened in the exporting process). Nothing stays open on error."""
    if len(raw_handle) != IPC_HANDLE_BYTES:
        raise ValueError(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(raw_handle)}")
    if byte_size < 1:
        raise ValueError(f"byte_size must be positive, got {byte_size}")
    with _on_device(device_id) as rt:
        ptr = int(call_cuda(rt.ipcOpenMemHandle, bytes(raw_handle), _IPC_LAZY_ENABLE_PEER_ACCESS))
        try:
            check_ipc_device(int(call_cuda(rt.pointerGetAttributes, ptr).device), device_id)
            # The pointer need not be the start of what the driver reports: cudaMalloc may
            # sub-allocate small buffers from one block, and IPC then maps the whole block
            # (CUDA Programming Guide, IPC). What counts is the room from the pointer on, the
            # one check Triton makes too (a size check, shared_memory_manager.cc).
            base, allocation = _address_range(ptr)
            available = base + allocation - ptr
            check_ipc_size(available, byte_size)
        except BaseException:
            call_cuda(rt.ipcCloseMemHandle, ptr)
            raise
    return CudaIpcRegion(ptr, byte_size, device_id, available)


# The checks of an opened handle, for a first open and for a registration that reuses a
# mapping already open (runtime.engine.regions.SharedOpener): one wording for both.


def check_ipc_device(device: int, device_id: int) -> None:
    """ValueError unless the handle's memory is on `device_id`."""
    if device != device_id:
        raise ValueError(f"the handle is memory of device {device}, not device {device_id}")


def check_ipc_size(available: int, byte_size: int) -> None:
    """ValueError unless the `available` bytes from the handle's address on (to the end of its
    allocation) hold the `byte_size` bytes registered."""
    if available < byte_size:
        raise ValueError(
            f"the handle's allocation has {available} bytes from its address; "
            f"{byte_size} bytes were registered"
        )


@functools.cache
def _libcuda() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise CudaError(f"cannot load the CUDA driver library libcuda.so.1: {exc}") from exc


def _driver_error_name(lib: ctypes.CDLL, status: int) -> str:
    name = ctypes.c_char_p()
    if lib.cuGetErrorName(ctypes.c_int(status), ctypes.byref(name)) == 0 and name.value:
        return name.value.decode()
    return "CUDA_ERROR"


def _mem_get_address_range(ptr: int) -> tuple[int, int]:
    # cupy wraps no cuMemGetAddressRange, so the driver is called directly; the runtime calls
    # before this one made the device's primary context current on this thread.
    lib = _libcuda()
    base = ctypes.c_uint64()
    size = ctypes.c_size_t()
    status = int(
        lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    )
    if status != 0:
        raise _DriverCallFailed(status, _driver_error_name(lib, status))
    return int(base.value), int(size.value)


def _address_range(ptr: int) -> tuple[int, int]:
    """(base, size) of the device allocation containing `ptr`."""
    return call_cuda(_mem_get_address_range, ptr)
