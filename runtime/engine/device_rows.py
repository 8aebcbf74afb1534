"""Requests whose tensors live in client CUDA shared memory, inside a CUDA-graph batch.

A captured bucket has static device buffers bound once (runtime.engine.graphs). A request whose
input is in a region (device memory) gets its rows copied device to device straight into the
bucket's input buffer at its row offset; a host request's rows are uploaded there the same way,
and the padding rows are zeroed, so a batch may mix both. After the replay, an output the
client placed in a region is copied device to device from the bucket's output buffer at the
request's row offset. Nothing of a region's tensor goes through the host.

Copies use the region table's `Copier` (runtime.engine.regions): cudaMemcpy on a GPU, memmove
on the CPU stand-in, which is how CPU tests drive this with `cpu_graphs` and `fake_cuda_ipc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.engine.regions import Copier

__all__ = ["DeviceRows", "copy_rows_into", "has_device_rows"]


@dataclass(frozen=True, slots=True)
class DeviceRows:
    """One request's rows of one input, at device address `ptr` (a client region). Has the
    `shape` and `dtype` a batch check reads from a numpy array."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def has_device_rows(arrays: Sequence[object]) -> bool:
    return any(type(a) is DeviceRows for a in arrays)


def copy_rows_into(
    dst: int,
    row_nbytes: int,
    arrays: Sequence[Any],
    bucket: int,
    copier: Copier,
    device_id: int,
) -> None:
    """Fill a bucket's bound input buffer at device address `dst`: each request's rows in turn
    (device to device from a region, host to device from an array), then zeros up to `bucket`
    rows. The caller synchronises before the replay reads the buffer."""
    pos = 0
    for a in arrays:
        n = a.shape[0] * row_nbytes
        if type(a) is DeviceRows:
            copier.copy(dst + pos, a.ptr, n, device_id)
        else:
            host = np.ascontiguousarray(a)
            copier.upload(dst + pos, host.ctypes.data, n, device_id)
        pos += n
    if pos < bucket * row_nbytes:
        copier.zero(dst + pos, bucket * row_nbytes - pos, device_id)
