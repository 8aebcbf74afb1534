"""runtime.engine.batcher: batch formation (pure), the bounded queue, the loop and its drain."""

from __future__ import annotations

import errno
import itertools
import logging
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.engine.batcher import (
    DEFAULT_MAX_QUEUE_SIZE,
    Batcher,
    BatcherClosed,
    Pending,
    QueueFull,
    _form,
    form_batch,
)

MS = 1_000_000


def req(call_id: int, rows: int = 1, at: int = 0, deadline: int = 0) -> Pending[None]:
    return Pending(call_id, rows, at, deadline, payload=None)


def ids(items: list[Pending[None]]) -> list[int]:
    return [p.call_id for p in items]


class FakeClock:
    """Nanoseconds that move only when the test says so (read from any thread)."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


class Recorder:
    """A fake execute/expire pair: records what the loop hands over."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.expired: list[int] = []
        self.ran = threading.Event()

    def execute(self, batch: list[Pending[None]]) -> None:
        self.batches.append(ids(batch))
        self.ran.set()

    def expire(self, item: Pending[None]) -> None:
        self.expired.append(item.call_id)


# ----------------------------------------------------------------------------- form_batch


def test_empty_queue_waits_for_a_submit() -> None:
    assert form_batch([], 0, 8, (), MS) == ([], [], None)


def test_full_batch_is_released_before_the_delay() -> None:
    queue = [req(1, 3), req(2, 5), req(3, 1)]
    batch, expired, wait = form_batch(queue, 0, 8, (), 10 * MS)
    assert ids(batch) == [1, 2]
    assert expired == []
    assert wait == 10 * MS  # request 3 stays, with its whole delay ahead


def test_next_request_that_does_not_fit_releases_the_prefix_without_splitting() -> None:
    batch, _, _ = form_batch([req(1, 4), req(2, 5)], 0, 8, (), 10 * MS)
    assert ids(batch) == [1]  # 4 rows; request 2 (5 rows) is never split to fill the batch


def test_partial_batch_waits_for_the_oldest_delay() -> None:
    queue = [req(1, 1, at=0), req(2, 2, at=3 * MS)]
    batch, _, wait = form_batch(queue, 4 * MS, 8, (), 10 * MS)
    assert batch == [] and wait == 6 * MS


def test_delay_expiry_releases_what_fits() -> None:
    queue = [req(1, 1, at=0), req(2, 2, at=3 * MS)]
    batch, _, wait = form_batch(queue, 10 * MS, 8, (), 10 * MS)
    assert ids(batch) == [1, 2] and wait is None


def test_zero_delay_releases_at_once() -> None:
    batch, _, _ = form_batch([req(1, 1)], 0, 8, (), 0)
    assert ids(batch) == [1]


def test_preferred_size_releases_early_and_keeps_the_rest() -> None:
    queue = [req(1, 2, at=0), req(2, 2, at=0), req(3, 1, at=MS)]
    batch, _, wait = form_batch(queue, MS, 8, (4,), 10 * MS)
    assert ids(batch) == [1, 2]  # 4 rows = preferred, before the delay
    assert wait == 10 * MS  # request 3 arrived at 1 ms: its delay is whole


def test_largest_reachable_preferred_size_wins() -> None:
    queue = [req(i, 1) for i in range(1, 6)]
    batch, _, _ = form_batch(queue, 0, 8, (2, 4), 10 * MS)
    assert ids(batch) == [1, 2, 3, 4]


def test_unreachable_preferred_size_waits() -> None:
    batch, _, _ = form_batch([req(1, 3)], 0, 8, (2, 4), 10 * MS)
    assert batch == []


# Past the largest preferred size, as Triton's GetDynamicBatch (core dynamic_batch_scheduler.cc):
# more rows could not make a preferred batch, so waiting for them only adds latency.


@pytest.mark.parametrize("rows", [4, 5, 6, 8])
def test_a_lone_request_at_or_past_the_largest_preferred_size_runs_at_once(rows: int) -> None:
    batch, _, wait = form_batch([req(1, rows)], 0, 8, (4,), 500 * MS)
    assert ids(batch) == [1] and wait is None


def test_the_prefix_before_a_request_that_passes_the_largest_preferred_size_runs_at_once() -> None:
    queue = [req(1, 3, at=0), req(2, 3, at=MS)]
    batch, _, wait = form_batch(queue, MS, 8, (4,), 500 * MS)
    assert ids(batch) == [1]  # 3 rows now; 6 would pass 4
    assert wait == 500 * MS  # request 2 waits for its own delay (or more requests)


def test_a_preferred_size_found_before_passing_the_largest_one_wins() -> None:
    # 2 = preferred; 2+1 = 3 is not; 3+3 passes 4: Triton runs the 2-row prefix.
    queue = [req(1, 2), req(2, 1), req(3, 3)]
    batch, _, _ = form_batch(queue, 0, 8, (2, 4), 500 * MS)
    assert ids(batch) == [1]


def test_past_the_delay_everything_that_fits_runs() -> None:
    queue = [req(1, 3, at=0), req(2, 3, at=0)]
    batch, _, _ = form_batch(queue, 500 * MS, 8, (4,), 500 * MS)
    assert ids(batch) == [1, 2]  # 6 rows: the delay passed, preferred sizes no longer shape it


def test_without_a_delay_preferred_sizes_still_shape_batches() -> None:
    batch, _, _ = form_batch([req(1, 3), req(2, 3)], 0, 8, (4,), 0)
    assert ids(batch) == [1]
    batch, _, _ = form_batch([req(1, 2), req(2, 2), req(3, 1)], 0, 8, (4,), 0)
    assert ids(batch) == [1, 2]
    batch, _, _ = form_batch([req(1, 1), req(2, 2)], 0, 8, (4,), 0)
    assert ids(batch) == [1, 2]  # below every preferred size: all of it, at once


def test_without_preferred_sizes_max_batch_size_is_the_target() -> None:
    batch, _, _ = form_batch([req(1, 5), req(2, 2)], 0, 8, (), 500 * MS)
    assert batch == []  # 7 rows < 8: waits for the delay (Triton: preferred = [8])
    batch, _, _ = form_batch([req(1, 5), req(2, 4)], 0, 8, (), 500 * MS)
    assert ids(batch) == [1]  # 9 would pass 8


def test_expired_requests_are_never_in_a_batch() -> None:
    queue = [req(1, 1, deadline=5 * MS), req(2, 1, deadline=20 * MS), req(3, 1, deadline=2 * MS)]
    batch, expired, _ = form_batch(queue, 5 * MS, 8, (), 0)
    assert ids(expired) == [1, 3]  # deadline <= now, wherever they were queued
    assert ids(batch) == [2]


def test_wait_ends_at_the_first_deadline() -> None:
    batch, expired, wait = form_batch([req(1, 1, deadline=3 * MS)], 0, 8, (), 10 * MS)
    assert batch == [] and expired == [] and wait == 3 * MS


def test_oversized_request_runs_alone() -> None:
    batch, _, _ = form_batch([req(1, 12), req(2, 1)], 0, 8, (), 10 * MS)
    assert ids(batch) == [1]


def test_drain_ignores_delay_and_preferred_sizes() -> None:
    batch, _, _ = form_batch([req(1, 1), req(2, 2)], 0, 8, (4,), 10 * MS, drain=True)
    assert ids(batch) == [1, 2]


queues = st.lists(
    st.tuples(st.integers(1, 6), st.integers(0, 20), st.integers(0, 30)), max_size=12
).map(lambda xs: [req(i, rows, at, dl) for i, (rows, at, dl) in enumerate(xs)])


@given(
    queue=queues,
    now=st.integers(0, 30),
    max_batch=st.integers(1, 10),
    preferred=st.sets(st.integers(1, 10)).map(lambda s: tuple(sorted(s))),
    delay=st.integers(0, 15),
)
def test_batch_is_a_fifo_prefix_and_nothing_is_lost(
    queue: list[Pending[None]],
    now: int,
    max_batch: int,
    preferred: tuple[int, ...],
    delay: int,
) -> None:
    preferred = tuple(s for s in preferred if s <= max_batch)  # as Batcher requires
    batch, expired, wait = form_batch(queue, now, max_batch, preferred, delay)
    live = [p for p in queue if not p.expired_at(now)]
    assert expired == [p for p in queue if p.expired_at(now)]
    assert batch == live[: len(batch)]  # FIFO prefix: no reordering, no skipping
    rows = sum(p.batch_size for p in batch)
    assert rows <= max_batch or len(batch) == 1  # never split; oversized runs alone
    if live and not batch:
        assert wait is not None and wait > 0  # waiting always has a timed end
    target = max(preferred) if preferred else max_batch
    if len(batch) < len(live):
        nxt = live[len(batch)].batch_size
        assert batch == [] or rows + nxt > target or rows in preferred
    if live and not batch:
        # It waits only while no prefix is a preferred size and all of it is below the target.
        sums = list(itertools.accumulate(p.batch_size for p in live))
        assert sums[-1] < target and not set(sums) & set(preferred)


@given(
    queue=queues.filter(lambda q: len(q) == 1),
    now=st.integers(0, 30),
    max_batch=st.integers(1, 10),
    preferred=st.sets(st.integers(1, 10)).map(lambda s: tuple(sorted(s))),
    delay=st.integers(0, 15),
    drain=st.booleans(),
)
def test_a_lone_request_is_decided_as_any_queue_is(
    queue: list[Pending[None]],
    now: int,
    max_batch: int,
    preferred: tuple[int, ...],
    delay: int,
    drain: bool,
) -> None:
    """form_batch's shortcut for one queued request decides what the general rule does."""
    general = _form(queue, now, max_batch, preferred, delay, drain)
    assert form_batch(queue, now, max_batch, preferred, delay, drain=drain) == general


# ----------------------------------------------------------------------------- Batcher, no threads


def test_poll_follows_the_injected_clock() -> None:
    clock, rec = FakeClock(), Recorder()
    b: Batcher[None] = Batcher(8, max_queue_delay_ns=2 * MS, clock=clock)
    b.submit(req(1, 1, at=clock()))
    assert b.poll(rec.execute, rec.expire).wait_ns == 2 * MS
    clock.now = 2 * MS
    b.poll(rec.execute, rec.expire)
    assert rec.batches == [[1]]
    s = b.stats()
    assert (s.queued, s.batches, s.batched_requests, s.batched_rows) == (0, 1, 1, 1)


def test_deadline_expired_in_the_queue_is_never_computed() -> None:
    clock, rec = FakeClock(), Recorder()
    b: Batcher[None] = Batcher(8, max_queue_delay_ns=5 * MS, clock=clock)
    b.submit(req(1, 1, deadline=MS))
    b.submit(req(2, 1))
    clock.now = 5 * MS
    b.poll(rec.execute, rec.expire)
    assert rec.expired == [1] and rec.batches == [[2]]
    assert b.stats().expired == 1


def test_queue_full() -> None:
    b: Batcher[None] = Batcher(8, max_queue_delay_ns=MS, max_queue_size=2, name="dense:1")
    b.submit(req(1))
    b.submit(req(2))
    with pytest.raises(QueueFull, match=r"dense:1: queue full \(2 requests waiting"):
        b.submit(req(3))
    assert b.stats().rejected == 1 and b.stats().queued == 2
    assert DEFAULT_MAX_QUEUE_SIZE == Batcher(1).max_queue_size == 1024


def test_count_queued_counts_waiting_requests_by_payload() -> None:
    b: Batcher[str] = Batcher(8, max_queue_delay_ns=MS)
    for i, owner in enumerate(["a", "b", "a"]):
        b.submit(Pending(i, 1, 0, payload=owner))
    assert b.count_queued(lambda owner: owner == "a") == 2
    assert b.count_queued(lambda owner: owner == "c") == 0
    b.poll(lambda batch: None, lambda p: None)  # the clock is past the delay: all three go
    assert b.count_queued(lambda owner: True) == 0


def test_cancel_takes_a_queued_request_out_and_the_rest_batches_without_it() -> None:
    """A request whose caller gave up leaves the queue (its place is free for the next
    submit) and is handed back to be answered; the others batch as if it never came."""
    clock = FakeClock()
    b: Batcher[str] = Batcher(8, max_queue_delay_ns=MS, max_queue_size=3, clock=clock)
    for i in (1, 2, 3):
        b.submit(Pending(i, 1, 0, payload="a"))
    taken = b.cancel(2, lambda owner: owner == "a")
    assert taken is not None and (taken.call_id, taken.payload) == (2, "a")
    b.submit(Pending(4, 1, 0, payload="a"))  # the cancelled one's place: not QueueFull
    clock.now = MS
    formed = b.poll(lambda batch: None, lambda p: None)
    assert [p.call_id for p in formed.batch] == [1, 3, 4] and formed.expired == []
    s = b.stats()
    assert (s.queued, s.cancelled, s.batched_requests, s.rejected) == (0, 1, 3, 0)


def test_cancel_matches_the_owner_too_as_call_ids_repeat_across_fronts() -> None:
    b: Batcher[str] = Batcher(8, max_queue_delay_ns=MS)
    b.submit(Pending(7, 1, 0, payload="front a"))
    b.submit(Pending(7, 1, 0, payload="front b"))
    taken = b.cancel(7, lambda owner: owner == "front b")
    assert taken is not None and taken.payload == "front b"
    assert b.cancel(7, lambda owner: owner == "front b") is None  # gone: answered once
    assert b.count_queued(lambda owner: owner == "front a") == 1


def test_cancel_leaves_a_request_already_in_a_batch_alone() -> None:
    """A request taken into a batch runs to its end (its answer frees what it holds):
    cancel() finds nothing, changes nothing, and counts nothing."""
    rec = Recorder()
    b: Batcher[None] = Batcher(8)  # no delay: released at once
    b.submit(req(1))
    b.poll(rec.execute, rec.expire)
    assert rec.batches == [[1]]
    assert b.cancel(1, lambda payload: True) is None
    assert b.cancel(99, lambda payload: True) is None  # never queued
    assert b.stats().cancelled == 0


def test_submit_after_close_is_refused() -> None:
    b: Batcher[None] = Batcher(8)
    assert b.close() is True  # nothing queued, no loop
    with pytest.raises(BatcherClosed):
        b.submit(req(1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_size": 4, "preferred": (8,)},
        {"max_batch_size": 4, "preferred": (0,)},
        {"max_batch_size": 4, "max_queue_delay_ns": -1},
        {"max_batch_size": 4, "max_queue_size": 0},
    ],
)
def test_config_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Batcher(**kwargs)  # type: ignore[arg-type]


def test_a_raising_callback_is_logged_and_the_queue_moves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(batch: list[Pending[None]]) -> None:
        raise RuntimeError("kaboom")

    b: Batcher[None] = Batcher(1, name="m:1")
    b.submit(req(1))
    b.submit(req(2))
    with caplog.at_level(logging.ERROR):
        b.poll(boom, Recorder().expire)
    assert "m:1: execute_batch(calls [1]) raised" in caplog.text
    rec = Recorder()
    b.poll(rec.execute, rec.expire)
    assert rec.batches == [[2]]


# ----------------------------------------------------------------------------- Batcher, threads


def start(b: Batcher[None], rec: Recorder) -> threading.Thread:
    t = threading.Thread(target=b.run, args=(rec.execute, rec.expire), daemon=True)
    t.start()
    return t


def test_loop_waits_on_the_injected_clock() -> None:
    clock, rec = FakeClock(), Recorder()
    b: Batcher[None] = Batcher(8, max_queue_delay_ns=MS, clock=clock)
    t = start(b, rec)
    b.submit(req(1, 2, at=0))
    b.submit(req(2, 3, at=0))
    time.sleep(0.02)  # ~20 re-checks of a clock that does not move: nothing may run
    assert rec.batches == []
    clock.now = MS
    assert rec.ran.wait(5)
    assert rec.batches == [[1, 2]]
    assert b.close(timeout=5) is True
    t.join(5)
    assert not t.is_alive()


def test_loop_with_the_real_clock_releases_a_full_batch() -> None:
    rec = Recorder()
    b: Batcher[None] = Batcher(3, max_queue_delay_ns=2_000 * MS)  # the delay never decides
    t = start(b, rec)
    for i in range(3):
        b.submit(req(i, at=time.monotonic_ns()))
    assert rec.ran.wait(5)
    assert rec.batches == [[0, 1, 2]]
    b.close(timeout=5)
    t.join(5)


def test_loop_with_the_real_clock_releases_after_a_short_delay() -> None:
    rec = Recorder()
    b: Batcher[None] = Batcher(8, max_queue_delay_ns=5 * MS)
    t = start(b, rec)
    t0 = time.monotonic_ns()
    b.submit(req(1, at=t0))
    assert rec.ran.wait(5)
    assert time.monotonic_ns() - t0 >= 5 * MS
    assert rec.batches == [[1]]
    b.close(timeout=5)
    t.join(5)


def test_close_drains_the_queue_then_stops() -> None:
    clock, rec = FakeClock(), Recorder()
    b: Batcher[None] = Batcher(8, preferred=(8,), max_queue_delay_ns=10**12, clock=clock)
    t = start(b, rec)
    b.submit(req(0, 8))  # a full batch runs at once: the loop is up
    assert rec.ran.wait(5)
    for i, rows in enumerate([1, 2, 3], start=1):
        b.submit(req(i, rows))
    b.submit(req(9, 1, deadline=1))
    time.sleep(0.01)
    assert rec.batches == [[0]]  # the rest waits for a delay that will not come
    clock.now = 1  # request 9's deadline passes: drained or not, it is never computed
    assert b.close(timeout=5) is True
    t.join(5)
    assert not t.is_alive()
    assert rec.batches == [[0], [1, 2, 3]]  # released without its delay or a preferred size
    assert rec.expired == [9]
    with pytest.raises(BatcherClosed):
        b.submit(req(10))


class EventIdle:
    """An in-memory Idle: records each wait's timeout, waits on an Event that wake() sets,
    and submits what the test left in `inbox` (as a channel's reads would) before returning."""

    def __init__(self, batcher: Batcher[None]) -> None:
        self.batcher = batcher
        self.timeouts: list[float | None] = []
        self.inbox: list[Pending[None]] = []
        self.woken = threading.Event()
        self.wakes = 0

    def wait(self, timeout_s: float | None) -> None:
        self.timeouts.append(timeout_s)
        self.woken.wait(timeout_s)
        self.woken.clear()
        while self.inbox:
            self.batcher.submit(self.inbox.pop(0))

    def wake(self) -> None:
        self.wakes += 1
        self.woken.set()

    def close(self) -> None:
        pass


def test_a_loop_with_an_idle_waits_there_and_is_woken_by_submits_and_close() -> None:
    clock, rec = FakeClock(), Recorder()
    b: Batcher[None] = Batcher(8, max_queue_delay_ns=3 * MS, clock=clock)
    idle = EventIdle(b)
    t = threading.Thread(target=b.run, args=(rec.execute, rec.expire, idle), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while not idle.timeouts:  # the loop found nothing and waits in the idle, untimed
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert idle.timeouts == [None]
    b.submit(req(1, at=0))  # another thread's submit wakes it; the delay is then its timeout
    while len(idle.timeouts) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert idle.timeouts[1] == pytest.approx(0.003)
    assert idle.wakes == 1 and rec.batches == []
    idle.inbox.append(req(2, 7, at=0))  # read by the idle itself: 8 rows, a full batch
    idle.woken.set()
    assert rec.ran.wait(5)
    assert rec.batches == [[1, 2]]
    assert b.close(timeout=5) is True  # close wakes it too, and the loop returns
    t.join(5)
    assert not t.is_alive()


class FailingOnceIdle(EventIdle):
    """Its first wait raises, as a channel's read can (a descriptor the kernel refused)."""

    def wait(self, timeout_s: float | None) -> None:
        if not self.timeouts:
            self.timeouts.append(timeout_s)
            raise OSError(errno.EMFILE, "Too many open files")
        super().wait(timeout_s)


def test_a_wait_that_raises_does_not_end_the_loop() -> None:
    """The loop is the version's only server: had it ended, every later call would wait
    forever in its queue."""
    rec = Recorder()
    b: Batcher[None] = Batcher(1)
    idle = FailingOnceIdle(b)
    t = threading.Thread(target=b.run, args=(rec.execute, rec.expire, idle), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while len(idle.timeouts) < 2:  # failed once, waits again
        assert time.monotonic() < deadline
        time.sleep(0.001)
    b.submit(req(1))
    assert rec.ran.wait(5)
    assert rec.batches == [[1]]
    assert b.close(timeout=5) is True
    t.join(5)
    assert not t.is_alive()


def test_run_after_close_drains_and_returns() -> None:
    rec = Recorder()
    b: Batcher[None] = Batcher(2, max_queue_delay_ns=10**12, clock=FakeClock())
    b.submit(req(1))
    assert b.close() is False  # queued, and no loop yet
    b.run(rec.execute, rec.expire)  # returns: nothing left
    assert rec.batches == [[1]]


def test_close_from_inside_the_loop_does_not_deadlock() -> None:
    b: Batcher[None] = Batcher(1)
    seen: list[bool] = []

    def execute(batch: list[Pending[None]]) -> None:
        seen.append(b.close(timeout=1))

    b.submit(req(1))
    b.submit(req(2))
    t = threading.Thread(target=b.run, args=(execute, Recorder().expire), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive()
    assert seen == [False, False]  # both still executed: close drains


def test_instances_run_batches_at_the_same_time() -> None:
    # Two run() loops (instance_group count 2): two batches execute at once, each request once,
    # and close() waits for both loops to drain and return.
    b: Batcher[None] = Batcher(2)
    both_inside = threading.Barrier(2, timeout=5)
    ran: list[list[int]] = []
    lock = threading.Lock()

    def execute(batch: list[Pending[None]]) -> None:
        with lock:
            ran.append([p.call_id for p in batch])
            first_two = len(ran) <= 2
        if first_two:
            both_inside.wait()  # BrokenBarrierError if the other batch never starts meanwhile

    rec = Recorder()
    loops = [
        threading.Thread(target=b.run, args=(execute, rec.expire), daemon=True) for _ in range(2)
    ]
    for t in loops:
        t.start()
    for i in range(1, 7):
        b.submit(req(i))
    assert b.close(timeout=5) is True
    for t in loops:
        t.join(5)
        assert not t.is_alive()
    assert not both_inside.broken
    assert sorted(c for batch in ran for c in batch) == [1, 2, 3, 4, 5, 6]
    assert all(len(batch) <= 2 for batch in ran)
