"""The stream a graph-served version's copies share with its replays.

onnxruntime's CUDA EP computes on the stream it is given as `user_compute_stream`. GraphSet
gives it one of these and queues the batch's host-to-device copies on it before the replay:
the copies are DMA ordered before the graph on the same stream, with no synchronisation of
their own (onnxruntime's replay ends with one, cuda_graph.cc `Replay`). Outputs come back with
asynchronous copies into pinned memory and a single synchronisation for all of them, instead
of `OrtValue.update_inplace` and `OrtValue.numpy()`, which are two more blocking cudaMemcpy
calls, the second into fresh pageable memory.

`CudaStream` is the CUDA one (cupy; created on the version's serving thread, which it leaves
on the version's device). `HostStream` performs the same calls as memmoves between host
addresses: with CPU OrtValues, whose `data_ptr()` is host memory, it is how the CPU tests run
GraphSet's stream path (ordering, padding, offsets) without a GPU.

Allowed imports: ctypes, runtime.ipc.pinning (CUDA only through it).
"""

from __future__ import annotations

import ctypes
from typing import Any, Final, Protocol

__all__ = ["CopyStream", "CudaStream", "HostStream"]

_H2D: Final = 1  # cudaMemcpyHostToDevice
_D2H: Final = 2  # cudaMemcpyDeviceToHost


class CopyStream(Protocol):
    """Copies queued in order on one stream; `synchronize()` waits for all of them."""

    @property
    def ptr(self) -> int:
        """The cudaStream_t, as onnxruntime's `user_compute_stream` option takes it."""
        ...

    def to_device(self, dst: int, src: int, nbytes: int) -> None: ...

    def to_host(self, dst: int, src: int, nbytes: int) -> None: ...

    def zero(self, dst: int, nbytes: int) -> None: ...

    def synchronize(self) -> None: ...


class CudaStream:
    """A non-blocking CUDA stream on `device_id` (it does not wait for the legacy stream,
    so the copies of client CUDA regions, queued there, are synchronised explicitly).
    Raises runtime.ipc.pinning.CudaError when CUDA is not usable here."""

    def __init__(self, device_id: int) -> None:
        from runtime.ipc.pinning import call_cuda, cuda_runtime

        rt = cuda_runtime()
        call_cuda(rt.setDevice, device_id)  # the serving thread works on this device only
        import cupy

        self._stream: Any = call_cuda(cupy.cuda.Stream, False, True)  # null=False, non_blocking
        self._ptr = int(self._stream.ptr)
        self._rt = rt
        self._call = call_cuda

    @property
    def ptr(self) -> int:
        return self._ptr

    def to_device(self, dst: int, src: int, nbytes: int) -> None:
        self._call(self._rt.memcpyAsync, dst, src, nbytes, _H2D, self._ptr)

    def to_host(self, dst: int, src: int, nbytes: int) -> None:
        self._call(self._rt.memcpyAsync, dst, src, nbytes, _D2H, self._ptr)

    def zero(self, dst: int, nbytes: int) -> None:
        self._call(self._rt.memsetAsync, dst, 0, nbytes, self._ptr)

    def synchronize(self) -> None:
        self._call(self._rt.streamSynchronize, self._ptr)


class HostStream:
    """The CopyStream calls as memmoves between host addresses, done at once (CPU tests)."""

    ptr = 0

    def __init__(self) -> None:
        self.calls: list[str] = []  # what was asked, in order: tests read it

    def to_device(self, dst: int, src: int, nbytes: int) -> None:
        self.calls.append("to_device")
        ctypes.memmove(dst, src, nbytes)

    def to_host(self, dst: int, src: int, nbytes: int) -> None:
        self.calls.append("to_host")
        ctypes.memmove(dst, src, nbytes)

    def zero(self, dst: int, nbytes: int) -> None:
        self.calls.append("zero")
        ctypes.memset(dst, 0, nbytes)

    def synchronize(self) -> None:
        self.calls.append("synchronize")
