"""A plain version's execution lane: the threads that run its calls that do not run inline on
their front's reader (runtime.engine.inline_gate) and are not batched.

Each version has its own, as each Triton model instance has its own thread: calls of one
version queue only behind that version's calls. With one FIFO pool shared by every model, two
slow calls of one model held both of its threads, and every other model's calls that needed a
thread (a batch size not seen before, every call right after a reload, any slow model) waited
behind them, past their deadlines.

A lane runs at most `threads` calls at once: the version's instance count (its config's
instance_group counts, summed; the worker's `exec_threads`, `--worker-threads`, without
instance_group). Threads are started as calls need them (ThreadPoolExecutor) and live until
the lane is retired, so a worker holds at most the sum of its versions' instance counts.

Allowed imports: stdlib.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["Lane"]


class Lane:
    """One version's calls, run in order of arrival by up to `threads` threads at once."""

    __slots__ = ("_pool", "threads")

    def __init__(self, name: str, version: int, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"lane-{name}-{version}")

    def submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue `fn(*args)`; False once the lane is retired (nothing queued then)."""
        try:
            self._pool.submit(fn, *args)
        except RuntimeError:  # retired (or the interpreter is exiting)
            return False
        return True

    def retire(self, *, drop_queued: bool = False) -> None:
        """Take no more calls. What is queued still runs (each call on the instance it was
        queued for, runtime.worker.Worker.queue_alone) unless `drop_queued` (the worker is
        stopping); the threads end once the queue is empty. Does not wait."""
        self._pool.shutdown(wait=False, cancel_futures=drop_queued)
