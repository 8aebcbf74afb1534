"""Dynamic batching for one model version: the pure decision `form_batch` and the thread-safe
`Batcher` (bounded queue + loop) that the worker runs on one dedicated thread per version.

Invariants: requests are never split and never reordered (a batch is a FIFO prefix of the live
queue); a batch never exceeds max_batch_size rows (a lone request larger than that, which the
front's validation should have refused, runs alone rather than block the queue forever); a
request whose deadline has passed is handed to `expire` and never computed; one its caller gave
up on is taken out by `cancel` (its owner answers it) and never computed either. Time comes
from an injected clock in nanoseconds (CLOCK_MONOTONIC in production, the same clock as
`Infer.deadline_ns`), so tests drive every decision deterministically.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, NamedTuple, Protocol, TypeVar

__all__ = [
    "DEFAULT_MAX_QUEUE_SIZE",
    "Batcher",
    "BatcherClosed",
    "BatcherStats",
    "Formed",
    "Idle",
    "Pending",
    "QueueFull",
    "form_batch",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_QUEUE_SIZE: Final = 1024
"""Requests (not rows) waiting per model version, as Triton's `max_queue_size` counts. The
arena's slots already bound the bytes in flight; this bound caps queueing latency: beyond it a
client is better served by RESOURCE_EXHAUSTED and a retry than by waiting behind 1024 calls."""


class QueueFull(Exception):
    """The bounded queue is full; the worker answers OVERLOADED (RESOURCE_EXHAUSTED)."""


class BatcherClosed(Exception):
    """submit() after close(): the version is unloading; the worker answers NOT_READY."""


@dataclass(frozen=True, slots=True)
class Pending(Generic[T]):
    """One queued request."""

    call_id: int
    batch_size: int  # rows this request contributes (its inputs' leading dimension)
    enqueued_ns: int  # clock() when it was queued
    deadline_ns: int = 0  # absolute, same clock; 0 = none
    payload: T = field(kw_only=True)  # what execute/expire need (the Infer call, its link...)

    def expired_at(self, now_ns: int) -> bool:
        return 0 < self.deadline_ns <= now_ns


class Formed(NamedTuple, Generic[T]):
    """The outcome of one `form_batch` decision."""

    batch: list[Pending[T]]  # run now (empty = keep waiting)
    expired: list[Pending[T]]  # answer DEADLINE_EXCEEDED; never compute
    wait_ns: int | None  # until the next timed event of what stays queued; None = none


def form_batch(
    queue: Sequence[Pending[T]],
    now_ns: int,
    max_batch_size: int,
    preferred: tuple[int, ...],
    max_queue_delay_ns: int,
    *,
    drain: bool = False,
) -> Formed[T]:
    """Decide what to run now, as Triton's dynamic batcher does (core's
    dynamic_batch_scheduler.cc, GetDynamicBatch). No preferred sizes means max_batch_size, as
    Triton's config normalisation sets it; the largest preferred size is "the target".

    1. Requests whose deadline passed are expired, wherever they are in the queue.
    2. Take the longest FIFO prefix of the rest that fits in max_batch_size rows (requests are
       not split, and skipping one would reorder). Within it, the best prefix is the last one
       whose rows equal a preferred size, or, if none was found before the next request would
       take the rows past the target, the prefix just before that request.
    3. Unless the oldest request has waited a non-zero max_queue_delay, a best prefix is
       released at once (with a delay of 0 too: preferred sizes still shape batches).
    4. Else the whole prefix is released when it cannot grow (the next request does not fit),
       when its rows reach the target, when the oldest request has waited max_queue_delay
       (0 = at once), or when draining.
    5. Else wait: until the oldest request's delay runs out or the first deadline passes.

    So a pending batch never waits once it has as many rows as the target, or once waiting
    could only take it past the target: more rows would not make a preferred batch.
    """
    if len(queue) == 1:  # the common case below saturation, decided without building lists
        p = queue[0]
        if p.expired_at(now_ns):
            return Formed([], [p], None)
        if (
            drain
            or p.batch_size >= (max(preferred) if preferred else max_batch_size)
            or now_ns - p.enqueued_ns >= max_queue_delay_ns
            or p.batch_size in preferred
        ):
            return Formed([p], [], None)
    return _form(queue, now_ns, max_batch_size, preferred, max_queue_delay_ns, drain)


def _form(
    queue: Sequence[Pending[T]],
    now_ns: int,
    max_batch_size: int,
    preferred: tuple[int, ...],
    max_queue_delay_ns: int,
    drain: bool,
) -> Formed[T]:
    """form_batch for any queue (form_batch decides a lone request itself)."""
    expired = [p for p in queue if p.expired_at(now_ns)]
    live = [p for p in queue if not p.expired_at(now_ns)] if expired else list(queue)
    if not live:
        return Formed([], expired, None)
    target = max(preferred) if preferred else max_batch_size
    rows = cut = best = 0
    for p in live:
        if cut and rows + p.batch_size > target and not best:
            best = cut  # waiting for this one would only take the batch past the target
        if cut and rows + p.batch_size > max_batch_size:
            break
        rows += p.batch_size
        cut += 1
        if rows in preferred:
            best = cut
        if rows >= max_batch_size:
            break
    waited = now_ns - live[0].enqueued_ns >= max_queue_delay_ns
    if best and not (waited and max_queue_delay_ns) and not drain:
        take = best
    elif rows >= target or cut < len(live) or waited or drain:
        take = cut
    else:
        take = 0
    rest = live[take:]
    return Formed(live[:take], expired, _next_event(rest, now_ns, max_queue_delay_ns))


def _next_event(rest: Sequence[Pending[T]], now_ns: int, delay_ns: int) -> int | None:
    if not rest:
        return None
    # The oldest request's delay (it is rest[0]: FIFO), or any deadline, whichever is first.
    due = rest[0].enqueued_ns + delay_ns
    for p in rest:
        if p.deadline_ns and p.deadline_ns < due:
            due = p.deadline_ns
    return max(0, due - now_ns)


class Idle(Protocol):
    """How a batching loop waits while nothing is due, instead of on the batcher's condition
    variable: e.g. in `select` on sockets whose calls it reads and submits itself
    (runtime.channels). `wait` returns after `wake()`, after the timeout, or when it has
    submitted something; `wake` is called by another thread's submit() or close(), under the
    batcher's lock, so it must not block. `close` frees what it waits on: whoever started
    the loop calls it once the loop is over (run() never does)."""

    def wait(self, timeout_s: float | None) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BatcherStats:
    queued: int  # requests waiting now
    queued_rows: int
    batches: int  # batches executed
    batched_requests: int
    batched_rows: int
    expired: int  # deadline passed while queued
    rejected: int  # QueueFull
    cancelled: int  # taken out by cancel(): the caller gave up while it waited


class Batcher(Generic[T]):
    """Bounded FIFO queue + batching loop for one model version.

    Any thread may `submit`. One or more threads (a version's instances) call
    `run(execute_batch, expire)`, which sleeps on a condition variable until `form_batch`
    releases something, then calls `expire(item)` for each expired request and
    `execute_batch(batch)` for the batch, outside the lock (new requests keep queueing, and form
    the next batch, or run on another instance, while one executes). Batches are still formed
    one at a time, in FIFO order, under the lock. Both callbacks own
    answering their requests; an exception escaping them is logged and the loop goes on,
    because a dead loop would leave every later caller waiting forever.

    `close()` refuses new requests, then the loop drains: it releases batches without waiting
    for delays or preferred sizes (deadlines still expire) and returns once the queue is empty.
    """

    def __init__(
        self,
        max_batch_size: int,
        *,
        preferred: Sequence[int] = (),
        max_queue_delay_ns: int = 0,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        clock: Callable[[], int] = time.monotonic_ns,
        name: str = "",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        bad = [s for s in preferred if not 1 <= s <= max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} are outside 1..{max_batch_size}")
        if max_queue_delay_ns < 0 or max_queue_size < 1:
            raise ValueError("max_queue_delay_ns must be >= 0 and max_queue_size >= 1")
        self.max_batch_size = max_batch_size
        self.preferred = tuple(sorted(set(preferred)))
        self.max_queue_delay_ns = max_queue_delay_ns
        self.max_queue_size = max_queue_size
        self.name = name or "batcher"
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[Pending[T]] = deque()
        self._closing = False
        self._runners: set[int] = set()  # thread ids of the active run() loops
        self._waiting: Idle | None = None  # a loop's Idle while it waits in it
        self._batches = self._batched_requests = self._batched_rows = 0
        self._expired = self._rejected = self._cancelled = 0

    def submit(self, item: Pending[T]) -> None:
        with self._cond:
            if self._closing:
                raise BatcherClosed(f"{self.name} is closing; not accepting requests")
            if len(self._queue) >= self.max_queue_size:
                self._rejected += 1
                raise QueueFull(
                    f"{self.name}: queue full ({len(self._queue)} requests waiting, "
                    f"max_queue_size {self.max_queue_size}); retry later"
                )
            self._queue.append(item)
            self._cond.notify()
            self._wake_idle()

    def cancel(self, call_id: int, where: Callable[[T], bool]) -> Pending[T] | None:
        """Take the queued request `call_id` whose payload satisfies `where` (call ids repeat
        across fronts) out of the queue, and return it: the caller answers it. None when it is
        not queued (in a batch already, answered, or never here). A cancel is rare (a client
        gave up): a pass over the queue, so that submit and batching pay nothing for it.

        What stays queued is decided again at the loop's next wake-up: a removed head leaves
        the loop waiting for the old head's delay at most, and then it waits for the new one."""
        with self._cond:
            for i, p in enumerate(self._queue):
                if p.call_id == call_id and where(p.payload):
                    del self._queue[i]  # (by index: equality would compare payloads)
                    self._cancelled += 1
                    return p
        return None

    def _wake_idle(self) -> None:
        # Under the lock. Once per wait: a loop that has not started waiting yet will see
        # what changed when it next decides (it sets _waiting under the lock, after deciding).
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.wake()

    def poll(
        self,
        execute_batch: Callable[[list[Pending[T]]], None],
        expire: Callable[[Pending[T]], None],
    ) -> Formed[T]:
        """One decision at clock() and its callbacks, without waiting (run's body)."""
        with self._cond:
            formed = self._take()
        self._dispatch(formed, execute_batch, expire)
        return formed

    def run(
        self,
        execute_batch: Callable[[list[Pending[T]]], None],
        expire: Callable[[Pending[T]], None],
        idle: Idle | None = None,
    ) -> None:
        """The batching loop; returns after close() once the queue is drained. With `idle`
        (one loop only), it waits there between batches instead of on the condition."""
        me = threading.get_ident()
        with self._cond:
            if me in self._runners:
                raise RuntimeError(f"{self.name}: run() is already active on this thread")
            self._runners.add(me)
        try:
            while True:
                with self._cond:
                    formed = self._take()
                    due = formed.batch or formed.expired
                    if not due:
                        if self._closing and not self._queue:
                            return
                        # submit() and close() notify; a timed event wakes us by timeout.
                        timeout = None if formed.wait_ns is None else formed.wait_ns / 1e9
                        if idle is None:
                            self._cond.wait(timeout)
                            continue
                        self._waiting = idle
                    elif self._queue and len(self._runners) > 1:
                        self._cond.notify()  # what is left may be another instance's batch
                if not due:
                    assert idle is not None
                    try:
                        idle.wait(timeout)  # outside the lock: it may submit
                    except Exception:
                        # This thread is the only one that serves the version: it must not end
                        # while the version takes calls (they would wait forever).
                        log.exception("%s: waiting between batches failed", self.name)
                        time.sleep(0.01)
                    self._waiting = None
                    continue
                self._dispatch(formed, execute_batch, expire)
        finally:
            with self._cond:
                self._runners.discard(me)
                self._cond.notify_all()

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting requests and let the loop drain the queue. Waits for the loop to
        return (unless called from the loop itself) and says whether it has; with no loop
        running, it says whether the queue is empty (a later run() drains it and returns)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._wake_idle()
            if not self._runners:
                return not self._queue
            if threading.get_ident() in self._runners:
                return False
            return self._cond.wait_for(lambda: not self._runners, timeout)

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(
                queued=len(self._queue),
                queued_rows=sum(p.batch_size for p in self._queue),
                batches=self._batches,
                batched_requests=self._batched_requests,
                batched_rows=self._batched_rows,
                expired=self._expired,
                rejected=self._rejected,
                cancelled=self._cancelled,
            )

    def count_queued(self, where: Callable[[T], bool]) -> int:
        """Requests waiting now whose payload satisfies `where` (e.g. those of one front)."""
        with self._cond:
            return sum(1 for p in self._queue if where(p.payload))

    def _take(self) -> Formed[T]:
        """Decide under the lock and remove what was decided from the queue."""
        if not self._queue:  # what run() finds after every batch, before it waits
            return Formed([], [], None)
        formed = form_batch(
            self._queue,
            self._clock(),
            self.max_batch_size,
            self.preferred,
            self.max_queue_delay_ns,
            drain=self._closing,
        )
        if formed.expired:
            gone = {id(p) for p in formed.batch} | {id(p) for p in formed.expired}
            self._queue = deque(p for p in self._queue if id(p) not in gone)
            self._expired += len(formed.expired)
        elif formed.batch:  # a FIFO prefix of the queue
            for _ in formed.batch:
                self._queue.popleft()
        if formed.batch:
            self._batches += 1
            self._batched_requests += len(formed.batch)
            self._batched_rows += sum(p.batch_size for p in formed.batch)
        return formed

    def _dispatch(
        self,
        formed: Formed[T],
        execute_batch: Callable[[list[Pending[T]]], None],
        expire: Callable[[Pending[T]], None],
    ) -> None:
        # Expired first: they are answered at once instead of after a whole batch's compute.
        for p in formed.expired:
            try:
                expire(p)
            except Exception:
                log.exception("%s: expire(call %d) raised", self.name, p.call_id)
        if formed.batch:
            try:
                execute_batch(formed.batch)
            except Exception:
                ids = [p.call_id for p in formed.batch]
                log.exception("%s: execute_batch(calls %s) raised", self.name, ids)
