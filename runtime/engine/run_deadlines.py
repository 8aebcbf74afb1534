"""Stopping onnxruntime runs whose caller's deadline has passed.

The front answers DEADLINE_EXCEEDED when a request's deadline passes, but a run already started
went on to its end, holding a thread of its version's lane (runtime.lanes): with a model whose
time follows its data (a Loop whose trip count is an input), a few such calls held every thread
of the lane for as long as their data said, and the version's other calls waited behind them.
onnxruntime checks a run's `RunOptions.terminate` between kernels (a Loop's body included) and
then fails the run; `RunWatch` sets that flag when the deadline passes, from one thread for the
whole worker.

Used for calls that have a deadline, of models whose calls may be long (runtime.engine.model:
control flow, or slow on average); a fast model's call would pay the bookkeeping (~2 µs) to
stop nothing.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

import onnxruntime as ort

__all__ = ["TERMINATED", "RunWatch"]

# What onnxruntime's error says of a run stopped by its terminate flag.
TERMINATED = "terminate flag"


class RunWatch:
    """Deadlines (time.monotonic_ns) of runs in progress; each one's RunOptions is told to
    terminate when its deadline passes, unless `done` came first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, ort.RunOptions]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, deadline_ns: int) -> tuple[int, ort.RunOptions]:
        """A RunOptions for one run, and the key that `done` takes."""
        options = ort.RunOptions()
        key = next(self._ids)
        with self._cond:
            self._live.add(key)
            heapq.heappush(self._heap, (deadline_ns, key, options))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="run-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == key:  # the earliest now: the watcher waits too long
                self._cond.notify()
        return key, options

    def done(self, key: int) -> None:
        with self._cond:
            self._live.discard(key)
            # Finished runs leave the heap as they reach its top; one far deadline on top would
            # keep the others in it, so it is rebuilt when they outnumber the live ones.
            if len(self._heap) > 2 * len(self._live) + 64:
                self._heap = [e for e in self._heap if e[1] in self._live]
                heapq.heapify(self._heap)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic_ns()
                while self._heap and (
                    self._heap[0][0] <= now or self._heap[0][1] not in self._live
                ):
                    _, key, options = heapq.heappop(self._heap)
                    if key in self._live:
                        options.terminate = True  # onnxruntime stops the run at its next kernel
                        self._live.discard(key)
                wait = (self._heap[0][0] - now) / 1e9 if self._heap else None
                self._cond.wait(wait)
