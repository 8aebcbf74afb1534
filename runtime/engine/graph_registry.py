"""The guard around captured CUDA graphs: what each bucket was captured with, checked before
every replay, and the replay / eager counters. Pure Python: no onnxruntime, no CUDA.

onnxruntime replays a captured graph before it validates inputs (`InferenceSession::Run` jumps
to `ReplayGraph()`), so a replay with another shape or buffer address is not refused: it reads
and writes the captured addresses anyway, silently wrong or an illegal-address abort. This
registry is the check onnxruntime does not do. Invariants: a bucket is registered once (its
graph lives as long as the session); every tensor bound to a bucket's graph, inputs and
outputs, has the bucket as its leading dimension and a non-null address; a replay is counted
only after its binding matched. Single writer (the version's serving thread, which is also the
only thread allowed to replay); `stats()` may be read from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["BindingLike", "GraphMismatch", "GraphRegistry", "GraphStats", "TensorBinding"]


class TensorBinding(NamedTuple):
    """One tensor bound to a graph, as (name, shape, dtype, address): a plain tuple, so callers
    may pass `(name, tuple(ortvalue.shape()), "float32", ortvalue.data_ptr())` directly."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    address: int


Signature = tuple[TensorBinding, ...]
BindingLike = tuple[str, Sequence[int], str, int]  # what callers pass; normalised on entry


class GraphMismatch(RuntimeError):
    """A replay was about to run with a binding other than the captured one; it was refused."""


@dataclass(frozen=True, slots=True)
class GraphStats:
    captured: tuple[int, ...]  # buckets with a registered graph, ascending
    replays: dict[int, int]  # bucket -> replays that passed the check
    eager: dict[int | None, int]  # bucket (None = above the largest) -> eager runs
    mismatches: int  # replays refused


class GraphRegistry:
    """bucket -> the binding its graph was captured with, plus per-bucket counters."""

    def __init__(self) -> None:
        self._captured: dict[int, Signature] = {}
        # What the caller passed at registration, as given: a check passing the same list is
        # accepted without normalising (the per-replay fast path; equal raw implies equal
        # normalised, so this never accepts what the full comparison would refuse).
        self._raw: dict[int, list[BindingLike]] = {}
        self._replays: dict[int, int] = {}
        self._eager: dict[int | None, int] = {}
        self._mismatches = 0
        self._lock = threading.Lock()  # only so that stats() sees consistent dicts

    def register(self, bucket: int, sig: Iterable[BindingLike]) -> None:
        """Record the binding a bucket's graph was captured with (every input and output)."""
        raw = list(sig)
        bound = _normalise(raw)
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        if bucket in self._captured:
            # onnxruntime refuses a second capture of one gpu_graph_id; so do we, earlier.
            raise ValueError(f"bucket {bucket} already has a captured graph")
        if not bound:
            raise ValueError(f"bucket {bucket}: a graph binds at least one tensor")
        names = [t.name for t in bound]
        if len(set(names)) != len(names):
            raise ValueError(f"bucket {bucket}: tensor names repeat in {names}")
        for t in bound:
            if not t.shape or t.shape[0] != bucket:
                raise ValueError(
                    f"bucket {bucket}: tensor '{t.name}' has shape {list(t.shape)}; "
                    f"a bucket's buffers have {bucket} rows"
                )
            if t.address == 0:
                raise ValueError(f"bucket {bucket}: tensor '{t.name}' has a null address")
        with self._lock:
            self._captured[bucket] = bound
            self._raw[bucket] = raw
            self._replays[bucket] = 0

    def is_captured(self, bucket: int) -> bool:
        return bucket in self._captured

    def check(self, bucket: int, sig: Iterable[BindingLike]) -> None:
        """Refuse (GraphMismatch) unless `sig` is exactly what `bucket` was captured with;
        on success count one replay. Call once, right before each replay."""
        raw = sig if isinstance(sig, list) else list(sig)
        if raw == self._raw.get(bucket):
            with self._lock:
                self._replays[bucket] += 1
            return
        bound = _normalise(raw)
        captured = self._captured.get(bucket)
        if captured is None:
            self._refused()
            raise GraphMismatch(
                f"bucket {bucket} has no captured graph (captured: {sorted(self._captured)}); "
                "refusing to replay it"
            )
        if bound != captured:  # the fast path is one tuple comparison
            self._refused()
            raise GraphMismatch(
                f"bucket {bucket}: binding differs from the captured graph: "
                f"{_describe(captured, bound)}; onnxruntime would replay the captured "
                "shapes and addresses unchecked, so this run is refused"
            )
        with self._lock:
            self._replays[bucket] += 1

    def record_eager(self, bucket: int | None) -> None:
        """Count one batch run without a graph: above the largest bucket (None), or in a
        bucket whose graph does not exist (model not capturable, capture failed)."""
        with self._lock:
            self._eager[bucket] = self._eager.get(bucket, 0) + 1

    def replays(self, bucket: int) -> int:
        return self._replays.get(bucket, 0)

    def eager(self, bucket: int | None) -> int:
        return self._eager.get(bucket, 0)

    def stats(self) -> GraphStats:
        with self._lock:
            return GraphStats(
                captured=tuple(sorted(self._captured)),
                replays=dict(sorted(self._replays.items())),
                eager=dict(self._eager),
                mismatches=self._mismatches,
            )

    def _refused(self) -> None:
        with self._lock:
            self._mismatches += 1


def _normalise(sig: Iterable[BindingLike]) -> Signature:
    # Shapes may arrive as lists (OrtValue.shape() returns one), dtypes as numpy dtypes;
    # sorted by name because IOBinding binds by name: equality then means "same tensors with
    # the same shapes, dtypes and addresses", whatever order the caller listed them in.
    return tuple(
        sorted(
            (
                TensorBinding(str(name), tuple(int(d) for d in shape), str(dtype), int(address))
                for name, shape, dtype, address in sig
            ),
            key=lambda t: t.name,
        )
    )


def _describe(captured: Signature, bound: Signature) -> str:
    was = {t.name: t for t in captured}
    now = {t.name: t for t in bound}
    diffs: list[str] = []
    for name in sorted(was.keys() - now.keys()):
        diffs.append(f"'{name}' is not bound")
    for name in sorted(now.keys() - was.keys()):
        diffs.append(f"'{name}' was not captured")
    for name in [t.name for t in captured if t.name in now]:
        a, b = was[name], now[name]
        if a.shape != b.shape:
            diffs.append(f"'{name}' shape {list(a.shape)} -> {list(b.shape)}")
        if a.dtype != b.dtype:
            diffs.append(f"'{name}' dtype {a.dtype} -> {b.dtype}")
        if a.address != b.address:
            diffs.append(f"'{name}' address {a.address:#x} -> {b.address:#x}")
    if not diffs:  # only a repeated name can get here
        diffs.append(f"tensors {[t.name for t in captured]} -> {[t.name for t in bound]}")
    return "; ".join(diffs)
