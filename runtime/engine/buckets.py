"""Batch-size buckets: the sizes a model version captures CUDA graphs for, and the padding that
maps any batch onto one of them. Pure (numpy only): no onnxruntime, no CUDA.

Invariants: a table's sizes are positive, unique and ascending; a batch of n rows runs in the
smallest bucket >= n, padded with zero rows that are trimmed from the outputs; a batch above the
largest bucket has no bucket and runs eagerly (counted by the caller, see `graph_registry`).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["BucketTable", "default_buckets", "pad_batch", "split_outputs"]

# Dense-then-sparse. Every size up to 8, as TensorRT-LLM's unpadded CudaGraphConfig table
# (range(1, 32)) and SGLang's speculative-decoding table (1..8) start; then vLLM's default
# capture sizes (range(8, 256, 8) + range(256, max + 1, 16), vllm/config/vllm.py). Small
# batches are where a server spends its quiet hours, and there padding costs the most: vLLM's
# [1, 2, 4, 8] runs 5 rows as 8, which for a transformer-sized model is 60% more compute than
# the 5 rows, while the four extra graphs cost four more captures at load and their own static
# buffers of at most 7 rows (docs/gpu.md §1 weighs this). Above 8 rows
# a step of 8 bounds the waste to 7 rows, and above 256 a step of 16 keeps the number of graphs
# (each costs capture time and arena peak) from growing with max_batch_size.
_DENSE_UP_TO: Final = 8
_STEP8_BELOW: Final = 256

Array = npt.NDArray[Any]


def default_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The default bucket sizes for a model whose config says `max_batch_size`.

    Every size up to 8, then multiples of 8 below 256, then multiples of 16, never above
    `max_batch_size`, and `max_batch_size` itself always last, so that every batch the batcher
    can form (it never exceeds max_batch_size) has a bucket. A model without a batch
    dimension (Triton's max_batch_size 0) has no bucket table: the caller handles it.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 to have buckets, got {max_batch_size}")
    sizes = [
        *range(1, _DENSE_UP_TO + 1),
        *range(2 * _DENSE_UP_TO, _STEP8_BELOW, 8),
        *range(_STEP8_BELOW, max_batch_size + 1, 16),
    ]
    return (*(s for s in sizes if s < max_batch_size), max_batch_size)


class BucketTable:
    """An immutable, validated list of bucket sizes with the size -> bucket lookup.

    An empty table is valid: every batch then runs eagerly (a model that cannot be captured).
    `graph_id(bucket)` is the onnxruntime `gpu_graph_id` of a bucket: its index + 1, because 0
    is onnxruntime's default graph and -1 means "do not capture".
    """

    __slots__ = ("_by_rows", "_sizes")

    def __init__(self, sizes: Iterable[int]) -> None:
        table = tuple(sizes)
        for s in table:
            # bool is an int subclass; True as a bucket size is a config mistake, not 1.
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"bucket sizes must be positive integers, got {s!r}")
        if any(a >= b for a, b in itertools.pairwise(table)):
            raise ValueError(f"bucket sizes must be strictly ascending (unique), got {table}")
        self._sizes: tuple[int, ...] = table
        # rows -> bucket for every batch up to the largest (index 0 unused): one tuple index
        # per batch instead of a bisect (GraphSet asks on every run)
        by_rows: list[int | None] = [None]
        for size in table:
            by_rows += [size] * (size - len(by_rows) + 1)
        self._by_rows: tuple[int | None, ...] = tuple(by_rows)

    @classmethod
    def default(cls, max_batch_size: int) -> BucketTable:
        return cls(default_buckets(max_batch_size))

    @property
    def sizes(self) -> tuple[int, ...]:
        return self._sizes

    @property
    def largest(self) -> int | None:
        return self._sizes[-1] if self._sizes else None

    def bucket_for(self, n: int) -> int | None:
        """The smallest bucket >= n rows; None above the largest (the eager path)."""
        if n < 1:
            raise ValueError(f"a batch has at least one row, got {n}")
        return self._by_rows[n] if n < len(self._by_rows) else None

    def graph_id(self, bucket: int) -> int:
        """onnxruntime's `gpu_graph_id` for `bucket` (index + 1; ids start at 1)."""
        i = bisect.bisect_left(self._sizes, bucket)
        if i == len(self._sizes) or self._sizes[i] != bucket:
            raise KeyError(f"{bucket} is not a bucket of {self._sizes}")
        return i + 1

    def capture_order(self) -> tuple[int, ...]:
        """Largest first, as vLLM captures: the largest bucket grows the memory arena to its
        peak once, so smaller captures find their intermediates already allocated."""
        return self._sizes[::-1]

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[int]:
        return iter(self._sizes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BucketTable) and other._sizes == self._sizes

    def __hash__(self) -> int:
        return hash(self._sizes)

    def __repr__(self) -> str:
        return f"BucketTable({list(self._sizes)})"


def pad_batch(arrays: Sequence[Array], to: int, *, out: Array | None = None) -> Array:
    """Stack the requests' rows (axis 0, in order) and zero-fill up to `to` rows.

    Every array must have the same dtype and the same shape after the first (batch) axis.
    With `out` (a static buffer of shape [to, ...], e.g. the bucket's staging buffer) the rows
    are written into it and it is returned, so its address never changes; otherwise a new
    array is allocated. Padding rows are zeros rather than stale data: zeros are a valid input
    for every numeric model, and a stale row could carry NaN/inf from an earlier batch.
    """
    if not arrays:
        raise ValueError("pad_batch needs at least one array")
    first = arrays[0]
    row_shape, dtype = first.shape[1:], first.dtype
    rows = 0
    for a in arrays:
        if a.ndim < 1 or a.shape[1:] != row_shape or a.dtype != dtype:
            raise ValueError(
                f"cannot batch {a.dtype}{list(a.shape)} with {dtype}{[-1, *row_shape]}: "
                "requests in one batch need the same dtype and row shape"
            )
        rows += a.shape[0]
    if rows > to:
        raise ValueError(f"{rows} rows do not fit a bucket of {to}")
    if out is None:
        out = np.empty((to, *row_shape), dtype=dtype)
    elif out.shape != (to, *row_shape) or out.dtype != dtype:
        raise ValueError(f"out is {out.dtype}{list(out.shape)}, expected {dtype}{[to, *row_shape]}")
    if len(arrays) == 1:
        out[:rows] = first
    else:  # one C loop over the requests (a slice assignment each costs a microsecond)
        np.concatenate(arrays, axis=0, out=out[:rows])
    out[rows:] = 0
    return out


def split_outputs(out: Array, sizes: Sequence[int]) -> list[Array]:
    """Split a batch output (axis 0) into one view per request and drop the padding rows.

    The pieces are views, not copies: when `out` is a graph's static output buffer, copy them
    (into the requests' arena slots) before the next replay overwrites it.
    """
    total = sum(sizes)
    if any(n < 0 for n in sizes):
        raise ValueError(f"negative request size in {list(sizes)}")
    if out.ndim < 1 or total > out.shape[0]:
        raise ValueError(f"{total} rows requested from an output of shape {list(out.shape)}")
    pieces: list[Array] = []
    pos = 0
    for n in sizes:
        pieces.append(out[pos : pos + n])
        pos += n
    return pieces
