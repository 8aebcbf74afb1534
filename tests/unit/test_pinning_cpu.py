"""runtime.ipc.pinning on a machine without CUDA: it imports, says CUDA is unavailable instead
of raising, turns every CUDA entry point into CudaError, and checks arguments before touching
CUDA. The CUDA round trips themselves are in tests/gpu/test_pinning.py."""

from __future__ import annotations

import importlib.util

import pytest

from runtime.ipc.pinning import (
    CudaError,
    alloc_pinned,
    call_cuda,
    cuda_available,
    device_memory_used,
    is_pinned,
    open_cuda_ipc_handle,
    pin_arena,
)

no_cupy = pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None, reason="cupy is installed here"
)


@no_cupy
def test_cuda_is_unavailable_without_cupy_and_that_is_not_an_error() -> None:
    assert cuda_available() is False


@no_cupy
def test_cuda_entry_points_raise_cuda_error_saying_why() -> None:
    buf = memoryview(bytearray(4096))
    with pytest.raises(CudaError, match="cannot import cupy"):
        pin_arena(buf)
    with pytest.raises(CudaError, match="cannot import cupy"):
        alloc_pinned(4096)
    with pytest.raises(CudaError, match="cannot import cupy"):
        is_pinned(0x1000)
    with pytest.raises(CudaError, match="cannot import cupy"):
        open_cuda_ipc_handle(bytes(64), 0, 16)
    with pytest.raises(CudaError, match="cannot import cupy"):
        device_memory_used(0)


def test_arguments_are_checked_before_cuda() -> None:
    with pytest.raises(ValueError, match="64 bytes, got 63"):
        open_cuda_ipc_handle(bytes(63), 0, 16)
    with pytest.raises(ValueError, match="byte_size must be positive"):
        open_cuda_ipc_handle(bytes(64), 0, 0)
    with pytest.raises(ValueError, match="non-empty"):
        pin_arena(memoryview(bytearray()))
    with pytest.raises(ValueError, match="contiguous"):
        pin_arena(memoryview(bytearray(64))[::2])
    with pytest.raises(ValueError, match="at least one byte"):
        alloc_pinned(0)


def test_call_cuda_passes_results_and_non_cuda_errors_through() -> None:
    assert call_cuda(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(TypeError):  # a bug in the caller stays a bug, not a CUDA error
        call_cuda(len, 1)
