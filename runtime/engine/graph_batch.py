"""What one batch of runtime.engine.graphs is made of: the requests' feeds, checked against the
model's inputs; the host staging memory they are gathered into (pinned when CUDA is there);
a bucket's bound buffers; and the result, padding trimmed and split per request.

Allowed imports: numpy, onnxruntime (types only),
runtime.engine.{batch_probe,buckets,capturability}, runtime.ipc.pinning (inside a function:
CUDA only when pinned memory is asked for).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from runtime.engine.batch_probe import follows_batch, not_batch_major
from runtime.engine.buckets import split_outputs
from runtime.engine.capturability import TensorSpec

__all__ = [
    "BadBatch",
    "BatchResult",
    "BatchTimings",
    "BucketBuffers",
    "HostBuffer",
    "UnsplitOutput",
    "check_feeds",
    "numpy_alloc",
    "per_request",
    "pinned_alloc",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]


class BadBatch(ValueError):
    """The requests of a batch do not match the model's inputs (names, dtypes, row shapes)."""


class UnsplitOutput(BadBatch):
    """An output of a batch does not have the batch's rows: it cannot be cut per request."""

    def __init__(self, output: str, shape: tuple[int, ...], rows: int) -> None:
        super().__init__(not_batch_major(output, shape, rows))
        self.output = output


class HostBuffer(Protocol):
    """Host memory for the staging buffers: `array` is a uint8 view, `pinned` whether it is
    page-locked (then copies from it finish before cudaMemcpy returns), `close()` frees it."""

    array: npt.NDArray[np.uint8]
    pinned: bool

    def close(self) -> None: ...


@dataclass(slots=True)
class _NumpyBuffer:
    array: npt.NDArray[np.uint8]
    pinned: bool = False

    def close(self) -> None:
        self.array = np.empty(0, dtype=np.uint8)


def numpy_alloc(nbytes: int) -> HostBuffer:
    return _NumpyBuffer(np.zeros(nbytes, dtype=np.uint8))


def pinned_alloc(nbytes: int) -> HostBuffer:
    from runtime.ipc.pinning import CudaError, alloc_pinned

    try:
        return alloc_pinned(nbytes)
    except CudaError as exc:
        log.warning(
            "pinned staging unavailable (%s); using pageable memory with a device "
            "synchronisation after each input copy",
            exc,
        )
        return numpy_alloc(nbytes)


@dataclass(slots=True)
class BucketBuffers:
    """What one bucket's graph was captured with. Shapes: every input and output is
    [bucket, *row_shape]. The OrtValues are the bound device buffers: write into them only in
    place (update_inplace, or a copy to `data_ptr()`); replacing an entry is exactly the rebind
    the registry refuses before the next replay."""

    bucket: int
    graph_id: int
    inputs: dict[str, ort.OrtValue]
    outputs: dict[str, ort.OrtValue]
    binding: Any  # onnxruntime.IOBinding, bound once
    run_options: ort.RunOptions  # gpu_graph_id = graph_id


@dataclass(frozen=True, slots=True)
class BatchTimings:
    gather_ns: int  # requests -> padded host staging (~0 when one pinned request fills it)
    h2d_ns: int  # staging -> bound device inputs (eager: inside run_ns)
    run_ns: int  # graph replay, or the eager run
    d2h_ns: int  # bound device outputs -> host arrays (eager: inside run_ns)

    @property
    def total_ns(self) -> int:
        return self.gather_ns + self.h2d_ns + self.run_ns + self.d2h_ns


@dataclass(frozen=True, slots=True)
class BatchResult:
    outputs: list[list[Array]]  # [request][output, in GraphSet.output_names order]
    rows: int  # real rows in the batch
    bucket: int | None  # the bucket the batch mapped to; None above the largest
    replayed: bool  # False: the eager path ran (counted in the registry)
    timings: BatchTimings
    # Replay only: device address of each bound output buffer ([bucket, *row_shape]).
    device_outputs: dict[str, int] | None = None


def check_feeds(feeds: Sequence[Mapping[str, Array]], inputs: Sequence[TensorSpec]) -> list[int]:
    """Rows per request, after checking names, dtypes and row shapes against the model."""
    if not feeds:
        raise BadBatch("a batch has at least one request")
    sizes: list[int] = []
    names = {s.name for s in inputs}
    for i, feed in enumerate(feeds):
        if feed.keys() != names:
            raise BadBatch(
                f"request {i} has inputs {sorted(feed)}; the model takes "
                f"{sorted(s.name for s in inputs)}"
            )
        rows = -1
        for spec in inputs:
            a = feed[spec.name]
            shape = a.shape
            if a.dtype != spec.dtype and spec.dtype.kind != "O":
                raise BadBatch(
                    f"request {i} input '{spec.name}' is {a.dtype}, the model takes {spec.dtype}"
                )
            row = shape[1:]
            if not shape or (row != spec.row_shape and not _matches(row, spec.row_shape)):
                raise BadBatch(
                    f"request {i} input '{spec.name}' has shape {list(shape)}, the model "
                    f"takes {[-1, *spec.row_shape]}"
                )
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise BadBatch(f"request {i}: inputs disagree on the batch size")
        if rows < 1:
            raise BadBatch(f"request {i} has no rows")
        sizes.append(rows)
    return sizes


def _matches(dims: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """dims fit wanted, where -1 in wanted matches any size."""
    return len(dims) == len(wanted) and all(w in (-1, d) for d, w in zip(dims, wanted, strict=True))


def per_request(
    results: list[Array], sizes: list[int], rows: int, names: Sequence[str]
) -> list[list[Array]]:
    """[output][rows] -> [request][output], padding dropped (views into `results`). `rows`:
    what the outputs were computed for (a replay's bucket, an eager run's real rows); `names`:
    the outputs'. UnsplitOutput when an output's first dimension is not `rows`: it is not the
    batch dimension (a NonZero's count, a reduction over the batch), and cut by rows one
    request would get another's results. A lone unpadded request needs no cut: its outputs
    are all its own, whatever their shape."""
    if len(sizes) == 1 and sizes[0] == rows:
        return [list(results)]
    for name, r in zip(names, results, strict=True):
        if not follows_batch(r.shape, rows):
            raise UnsplitOutput(name, tuple(r.shape), rows)
    if len(sizes) == 1:  # one request (every batch at concurrency 1): no transposition
        return [[split_outputs(r, sizes)[0] for r in results]]
    pieces = [split_outputs(r, sizes) for r in results]
    return [[p[i] for p in pieces] for i in range(len(sizes))]
