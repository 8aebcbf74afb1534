"""Answered requests, counted in bulk.

Updating a request's series one request at a time (a counter, three histograms, the inference
and execution counts) cost the event loop ~18k instructions per request, ~3 % of its work on
`dense`. Instead the request path appends one tuple per successful request to a deque
(`ServedLog.append`: a C call, no Python frame), and `fold` turns what accumulated into
per-(model, version, reason) tallies with numpy: on the event loop every 0.05 s, and on the
scrape thread before every collection, so a scrape counts every request answered before it.

Bucketing is the per-request rule exactly: `searchsorted(side="left")` is `bisect_left`, and
seconds are the same float64 divisions of integer nanoseconds. A fold runs under `lock`, and
the series of successful requests are written only under it: by folds, and by the loop's
count of an execution no served request carries (`Metrics.observe_execution`: an abandoned or
shadow call's, a failed request's), which writes the executions and batch-size series a fold
writes too. (Failures are counted directly, in series of their own.) So the loop and the
scrape thread never write the same value concurrently: a read-modify-write of both at once
lost counts.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter, itemgetter

import numpy as np
from numpy.typing import NDArray

from runtime.ipc.protocol import Timings

__all__ = ["Buckets", "ServedLog", "Tally"]

# An entry: (model, version, routing reason, front nanoseconds, the worker's Timings, batch).
Entry = tuple[str, int, str, int, Timings, int]
_KEY = itemgetter(0, 1, 2)
_ELAPSED = itemgetter(3)
_TIMINGS = itemgetter(4)
_BATCH = itemgetter(5)
_NUMBERS = attrgetter("queue_ns", "input_ns", "infer_ns", "output_ns", "executions", "batch_size")
_WIDTH = 6  # the numbers of one entry
_MODE = attrgetter("mode")
_REPLAY = "replay".__eq__
_FALLBACK = "fallback".__eq__


@dataclass(frozen=True, slots=True)
class Buckets:
    counts: list[int]  # per bound (first bound >= value), then +Inf
    total: float


@dataclass(frozen=True, slots=True)
class Tally:
    """One (model, version, reason)'s requests of a fold."""

    requests: int
    inferences: int
    latency: Buckets  # front end to end, seconds
    queue: Buckets  # the worker's queue wait, seconds
    compute: Buckets  # the worker's input + infer + output, seconds
    executions: int  # the calls the worker counted an execution on ...
    batch: Buckets  # ... their execution's batch size
    replays: int  # ... of those, CUDA-graph replays
    eager: int  # ... and eager runs of a model that has graphs


class ServedLog:
    def __init__(self, seconds_bounds: Sequence[float], batch_bounds: Sequence[float]) -> None:
        self._seconds = np.array(seconds_bounds, np.float64)
        self._batch = np.array(batch_bounds, np.float64)
        self._entries: deque[Entry] = deque()
        self.append: Callable[[Entry], None] = self._entries.append  # thread-safe, O(1)
        self.lock = threading.Lock()  # see the module's docstring

    def fold(self, apply: Callable[[tuple[str, int, str], Tally], None]) -> None:
        """Hand `apply` one tally per (model, version, reason) for the entries appended so
        far; `apply` runs under the fold lock (call from any thread)."""
        with self.lock:
            entries = self._entries
            n = len(entries)
            if not n:
                return
            popleft = entries.popleft  # never swapped: an append always lands in this deque
            got = [popleft() for _ in range(n)]
            for key, tally in self._tallies(got).items():
                apply(key, tally)

    def _tallies(self, got: list[Entry]) -> dict[tuple[str, int, str], Tally]:
        n = len(got)
        keys = list(map(_KEY, got))
        timings = list(map(_TIMINGS, got))
        numbers = np.fromiter(chain.from_iterable(map(_NUMBERS, timings)), np.int64, _WIDTH * n)
        numbers = numbers.reshape(n, _WIDTH)
        seconds = np.fromiter(map(_ELAPSED, got), np.int64, n) / 1e9
        queue = numbers[:, 0] / 1e9
        compute = numbers[:, 1:4].sum(axis=1) / 1e9
        batch = np.fromiter(map(_BATCH, got), np.int64, n)
        counted = numbers[:, 4] != 0
        modes = list(map(_MODE, timings))
        replay = counted & np.fromiter(map(_REPLAY, modes), bool, n)
        fallback = counted & np.fromiter(map(_FALLBACK, modes), bool, n)
        distinct = dict.fromkeys(keys)
        if len(distinct) == 1:
            groups: list[NDArray[np.intp] | slice] = [slice(None)]
        else:
            number = {key: i for i, key in enumerate(distinct)}
            codes = np.fromiter(map(number.__getitem__, keys), np.intp, n)
            groups = [np.flatnonzero(codes == i) for i in range(len(distinct))]
        out: dict[tuple[str, int, str], Tally] = {}
        for key, g in zip(distinct, groups, strict=True):
            ex = counted[g]
            out[key] = Tally(
                requests=int(seconds[g].size),
                inferences=int(batch[g].sum()),
                latency=_histogram(seconds[g], self._seconds),
                queue=_histogram(queue[g], self._seconds),
                compute=_histogram(compute[g], self._seconds),
                executions=int(ex.sum()),
                batch=_histogram(numbers[g, 5][ex].astype(np.float64), self._batch),
                replays=int(replay[g].sum()),
                eager=int(fallback[g].sum()),
            )
        return out


def _histogram(values: NDArray[np.float64], bounds: NDArray[np.float64]) -> Buckets:
    at = np.searchsorted(bounds, values, side="left")  # bisect_left: the `le` bucket
    counts = np.bincount(at, minlength=len(bounds) + 1)
    return Buckets(counts.tolist(), float(values.sum()))
