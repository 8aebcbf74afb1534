"""Shadow traffic, the pure parts: whether a request is mirrored, and how the shadow's outputs
differ from the served ones. May import: routing.split, numpy.

The caller sends the sampled request to the shadow version off the response path, skips it when
the served version is the shadow version, and records latency, errors and ``compare_outputs``;
a shadow failure never reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.routing.split import RandomSource, random_point

__all__ = ["OutputLike", "ShadowDiff", "compare_outputs", "should_shadow"]

# (name, KServe datatype, shape, raw little-endian bytes as on the wire)
OutputLike = tuple[str, str, Sequence[int], bytes]

_NUMERIC: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


@dataclass(frozen=True, slots=True)
class ShadowDiff:
    """``max_abs_diff``: the largest |served - shadow| over every numeric output compared
    (None when there was none). ``mismatched``: outputs that cannot be compared or differ in
    kind: present on one side only, other datatype or shape, a byte count that does not fit
    the shape, BYTES (or an unknown datatype) not byte-equal, NaN on one side only. Numbers
    are compared as float64 (integers beyond 2**53 may round; byte-equal tensors are 0.0)."""

    max_abs_diff: float | None
    mismatched: tuple[str, ...]

    @property
    def identical(self) -> bool:
        return not self.mismatched and not self.max_abs_diff


def should_shadow(source: int | RandomSource, sample_bp: int) -> bool:
    """Whether to mirror this request: a point in [0, 10000) (e.g. ``route_key_point(key,
    salt="shadow")`` for sticky sampling) or a random source, below ``sample_bp``."""
    point = source if isinstance(source, int) else random_point(source)
    return point < sample_bp


def compare_outputs(served: Sequence[OutputLike], shadow: Sequence[OutputLike]) -> ShadowDiff:
    """Compare the shadow's outputs with the served ones, by output name."""
    by_name = {t[0]: t for t in shadow}
    served_names = {t[0] for t in served}
    mismatched = {name for name in by_name if name not in served_names}
    worst: float | None = None
    for name, datatype, shape, data in served:
        other = by_name.get(name)
        if other is None or other[1] != datatype or tuple(other[2]) != tuple(shape):
            mismatched.add(name)
            continue
        if bytes(data) == bytes(other[3]):
            if datatype in _NUMERIC and worst is None:
                worst = 0.0
            continue
        if datatype not in _NUMERIC:
            mismatched.add(name)
            continue
        diff = _max_abs_diff(_array(data, datatype, shape), _array(other[3], datatype, shape))
        if diff is None:
            mismatched.add(name)
        else:
            worst = diff if worst is None else max(worst, diff)
    return ShadowDiff(worst, tuple(sorted(mismatched)))


def _array(data: bytes, datatype: str, shape: Sequence[int]) -> npt.NDArray[np.float64] | None:
    dtype = np.dtype(_NUMERIC[datatype])
    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if len(data) != count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype=dtype).astype(np.float64)


def _max_abs_diff(
    a: npt.NDArray[np.float64] | None, b: npt.NDArray[np.float64] | None
) -> float | None:
    """None when the two cannot be compared (bad size, NaN on one side only)."""
    if a is None or b is None:
        return None
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities count as equal too
    if same.all():
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a[~same] - b[~same])
    if np.isnan(diff).any():
        return None
    return float(diff.max())
