"""runtime.ipc.pinning on a GPU: hostRegister / hostUnregister of a shared-memory arena,
host <-> device copies from it, pinned staging buffers, CUDA errors through call_cuda, and
CUDA IPC handles exported by another process (Triton's CUDA shared memory)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.ipc.pinning import (
    CudaError,
    alloc_pinned,
    call_cuda,
    is_pinned,
    open_cuda_ipc_handle,
    pin_arena,
)
from runtime.ipc.shm import Arena

pytestmark = pytest.mark.gpu

SIZE = 4 * 1024 * 1024


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena(f"/microtune-gputest-{os.getpid()}", SIZE, create=True)
    try:
        yield a
    finally:
        a.close()
        a.unlink()
    assert not Path(f"/dev/shm/microtune-gputest-{os.getpid()}").exists()


def test_register_then_unregister_an_arena(arena: Arena) -> None:
    region = pin_arena(arena.buf)
    assert region.size == SIZE and is_pinned(region.ptr)
    assert is_pinned(region.ptr + SIZE - 1)
    region.close()
    assert region.closed and not is_pinned(region.ptr)
    region.close()  # idempotent


def test_registering_twice_is_a_cuda_error_naming_the_call(arena: Arena) -> None:
    with pin_arena(arena.buf):
        with pytest.raises(CudaError, match="hostRegister") as info:
            pin_arena(arena.buf)
        assert info.value.code is not None


def test_call_cuda_turns_cuda_failures_into_cuda_error() -> None:
    import cupy

    with pytest.raises(CudaError, match=r"hostUnregister\(0x12340000\) failed"):
        call_cuda(cupy.cuda.runtime.hostUnregister, 0x12340000)


def test_host_to_device_and_back_through_the_pinned_arena(arena: Arena) -> None:
    import cupy

    rt = cupy.cuda.runtime
    n = 1024 * 1024
    with pin_arena(arena.buf) as region:
        host = np.frombuffer(arena.buf, dtype=np.float32, count=n // 4, offset=4096)
        host[:] = np.arange(n // 4, dtype=np.float32)
        dev = cupy.empty(n // 4, dtype=np.float32)
        stream = cupy.cuda.Stream(non_blocking=True)
        call_cuda(
            rt.memcpyAsync, dev.data.ptr, region.ptr + 4096, n, rt.memcpyHostToDevice, stream.ptr
        )
        stream.synchronize()
        np.testing.assert_array_equal(cupy.asnumpy(dev), host)
        dev *= 2
        back = np.frombuffer(arena.buf, dtype=np.float32, count=n // 4, offset=4096 + n)
        cupy.cuda.Device().synchronize()
        call_cuda(
            rt.memcpyAsync,
            region.ptr + 4096 + n,
            dev.data.ptr,
            n,
            rt.memcpyDeviceToHost,
            stream.ptr,
        )
        stream.synchronize()
        np.testing.assert_array_equal(back, host * 2)
        del host, back  # numpy views hold the mapping: drop them before the arena closes


def test_onnxruntime_update_inplace_from_the_pinned_arena(arena: Arena) -> None:
    with pin_arena(arena.buf):
        x = np.frombuffer(arena.buf, dtype=np.float32, count=8 * 256).reshape(8, 256)
        x[:] = np.random.RandomState(0).standard_normal((8, 256))
        value = ort.OrtValue.ortvalue_from_shape_and_type([8, 256], np.float32, "cuda", 0)
        ptr = value.data_ptr()
        value.update_inplace(x)
        assert value.data_ptr() == ptr
        np.testing.assert_array_equal(value.numpy(), x)
        del x


def test_pinned_staging_buffer() -> None:
    with alloc_pinned(1 << 20) as buf:
        assert is_pinned(buf.ptr) and buf.array.nbytes == 1 << 20
        buf.array[:] = 7
        assert int(buf.array.sum()) == 7 << 20
    assert buf.closed and buf.array.size == 0


EXPORTER = textwrap.dedent(
    """
    import sys, cupy
    n = int(sys.argv[1])
    mem = cupy.cuda.Memory(n)                 # a whole cudaMalloc allocation, offset 0
    arr = cupy.ndarray((n,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
    arr[:] = cupy.arange(n, dtype=cupy.uint32).astype(cupy.uint8)
    cupy.cuda.Device().synchronize()
    print(cupy.cuda.runtime.ipcGetMemHandle(mem.ptr).hex(), flush=True)
    sys.stdin.readline()                      # keep the allocation alive until told
    """
)


@pytest.fixture
def exported() -> Iterator[tuple[bytes, int]]:
    n = 1 << 20
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line, "the exporting process printed no handle"
        yield bytes.fromhex(line), n
    finally:
        if proc.stdin is not None:
            proc.stdin.write("done\n")
            proc.stdin.close()
        proc.wait(timeout=60)


def test_open_a_cuda_ipc_handle_from_another_process(exported: tuple[bytes, int]) -> None:
    import cupy

    handle, n = exported
    assert len(handle) == 64
    with open_cuda_ipc_handle(handle, 0, n) as region:
        assert region.size == n and region.allocation_size >= n
        out = np.empty(n, dtype=np.uint8)
        rt = cupy.cuda.runtime
        call_cuda(rt.memcpy, out.ctypes.data, region.ptr, n, rt.memcpyDeviceToHost)
        np.testing.assert_array_equal(out, (np.arange(n, dtype=np.uint32) % 256).astype(np.uint8))
    assert region.closed


def test_a_region_larger_than_the_allocation_is_refused(exported: tuple[bytes, int]) -> None:
    handle, n = exported
    with pytest.raises(ValueError, match="allocation has"):
        open_cuda_ipc_handle(handle, 0, 64 * n)
    with open_cuda_ipc_handle(handle, 0, n) as region:  # the refused open left nothing open
        assert region.size == n


SMALL_EXPORTER = textwrap.dedent(
    """
    import sys, numpy as np, cupy
    rt = cupy.cuda.runtime
    ptrs = [rt.malloc(64) for _ in range(4)]  # as simple_grpc_cudashm_client does: small
    for i, p in enumerate(ptrs):              # cudaMallocs, which the driver may sub-allocate
        x = np.full(64, i + 1, np.uint8)
        rt.memcpy(p, x.ctypes.data, 64, rt.memcpyHostToDevice)
    rt.deviceSynchronize()
    print(" ".join(rt.ipcGetMemHandle(p).hex() for p in ptrs), flush=True)
    sys.stdin.readline()
    """
)


def test_small_consecutive_allocations_each_open_at_their_own_bytes() -> None:
    """Four 64-byte cudaMallocs in a row (tritonclient's CUDA shm example): each handle opens,
    passes the size check and reads its own bytes, wherever the driver placed the buffer."""
    import cupy

    proc = subprocess.Popen(
        [sys.executable, "-c", SMALL_EXPORTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        handles = [bytes.fromhex(h) for h in proc.stdout.readline().split()]
        assert len(handles) == 4
        rt = cupy.cuda.runtime
        for i, handle in enumerate(handles):
            with open_cuda_ipc_handle(handle, 0, 64) as region:
                out = np.empty(64, np.uint8)
                call_cuda(rt.memcpy, out.ctypes.data, region.ptr, 64, rt.memcpyDeviceToHost)
                np.testing.assert_array_equal(out, np.full(64, i + 1, np.uint8))
    finally:
        if proc.stdin is not None:
            proc.stdin.write("done\n")
            proc.stdin.close()
        proc.wait(timeout=60)


def test_a_garbage_handle_is_a_cuda_error() -> None:
    with pytest.raises(CudaError, match="ipcOpenMemHandle"):
        open_cuda_ipc_handle(bytes(range(64)), 0, 16)
